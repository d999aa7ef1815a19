"""Microsoft's Phi formats."""

from tasks.templates.base import Template

TEMPLATES = [
    # microsoft/Phi-3-mini-4k-instruct, Phi-3.5-mini-instruct: the template ends an un-prompted
    # conversation with EOS, which the suffix reproduces.
    Template(
        name="phi",
        system="<|system|>\n{content}<|end|>\n",
        user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
        assistant="{content}<|end|>\n",
        suffix="{eos_token}",
        stop_words=("<|end|>",),
        description="Phi-3 / Phi-3.5 '<|user|> ... <|end|>' turns",
    ),
    # microsoft/phi-4: ChatML-like with <|im_sep|> after the role and no newlines.
    Template(
        name="phi4",
        system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
        user="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
        assistant="{content}<|im_end|>",
        stop_words=("<|im_end|>",),
        description="Phi-4 '<|im_start|>role<|im_sep|>' turns",
    ),
    # microsoft/Phi-4-mini-instruct: Phi-3's tags without newlines; EOS closes an un-prompted conversation.
    Template(
        name="phi4_mini",
        system="<|system|>{content}<|end|>",
        user="<|user|>{content}<|end|><|assistant|>",
        assistant="{content}<|end|>",
        suffix="{eos_token}",
        tools="{content}<|tool|>{tool_list}<|/tool|>",
        stop_words=("<|end|>",),
        description="Phi-4-mini '<|user|>...<|end|><|assistant|>' turns",
    ),
]
