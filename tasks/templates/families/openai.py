"""OpenAI gpt-oss (harmony) as LlamaFactory renders it."""

from tasks.templates.base import Template

TEMPLATES = [
    # openai/gpt-oss-20b. LlamaFactory's rendering, not the published harmony template (which adds a
    # dated system header, developer instructions and per-channel endings): the reasoning is the
    # analysis channel, the reply the final channel, EOS (<|return|>) once after the conversation.
    Template(
        name="gpt_oss",
        system="<|start|>system<|message|>{content}<|end|>",
        user="<|start|>user<|message|>{content}<|end|><|start|>assistant",
        assistant="{content}",
        suffix="{eos_token}",
        efficient_eos=True,  # as LlamaFactory's: EOS labelled where each later prompt starts
        default_system="You are ChatGPT, a large language model trained by OpenAI.",
        thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
        stop_words=("<|return|>", "<|call|>"),
        description="gpt-oss harmony channels (LlamaFactory's rendering), analysis = thinking",
    ),
]
