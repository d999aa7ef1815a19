"""Meta's Llama chat formats."""

from tasks.templates.base import Template

TEMPLATES = [
    # meta-llama/Llama-2-*-chat-hf: BOS opens every exchange, the system block sits inside the first [INST].
    Template(
        name="llama2",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        system_in_user="first",
        user="{bos_token}[INST] {content} [/INST]",
        assistant=" {content} {eos_token}",
        description="Llama-2-chat '[INST] <<SYS>> ... [/INST]'",
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct; tool results come back as the 'ipython' role (Llama 3.1).
    Template(
        name="llama3",
        prefix="{bos_token}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        tool_format="llama3",
        description="Llama-3 / 3.1 / 3.2 instruct header turns (no date header; use auto for that)",
    ),
    # meta-llama/Llama-4-Scout-17B-16E-Instruct (text): Llama 3's layout with new header and end tokens.
    Template(
        name="llama4",
        prefix="{bos_token}",
        system="<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
        user="<|header_start|>user<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",
        assistant="{content}<|eot|>",
        observation="<|header_start|>ipython<|header_end|>\n\n{content}<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n",
        stop_words=("<|eot|>", "<|eom|>"),
        tool_format="llama3",
        description="Llama 4 '<|header_start|>role<|header_end|>' turns (text only)",
    ),
]
