"""IBM Granite 3.x / 4.0 role tokens."""

from tasks.templates.base import Template

USER = "<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
ASSISTANT = "{content}<|end_of_text|>\n"
SYSTEM = "<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n"

TEMPLATES = [
    # ibm-granite/granite-3.x-instruct: the turns of granite-3.0-8b-instruct's published template. From 3.1
    # the published templates also write a default system prompt with today's date when there is none;
    # like LlamaFactory, none is written here (set default_system for one).
    Template(name="granite3", system=SYSTEM, user=USER, assistant=ASSISTANT, stop_words=("<|end_of_text|>",),
             description="Granite 3.x '<|start_of_role|>user<|end_of_role|>' turns"),
    # ibm-granite/granite-4.0-*: the same turns, tool results in a 'tool' role. LlamaFactory's observation
    # format ends with 'assistant\n'; the published header '<|end_of_role|>' is written instead.
    Template(name="granite4", system=SYSTEM, user=USER, assistant=ASSISTANT,
             observation="<|start_of_role|>tool<|end_of_role|>{content}<|end_of_text|>\n"
             "<|start_of_role|>assistant<|end_of_role|>",
             default_system="You are Granite, developed by IBM. You are a helpful AI assistant.",
             stop_words=("<|end_of_text|>",), description="Granite 4.0 role turns with Granite's default system"),
]
