"""DeepSeek's chat formats."""

from tasks.templates.base import Template

TEMPLATES = [
    # deepseek-ai/deepseek-llm-7b-chat (and V2): a reply renders as 'Assistant: ' + content + EOS while the
    # generation prompt is 'Assistant:', so the space opens the reply.
    Template(
        name="deepseek",
        prefix="{bos_token}",
        system="{content}\n\n",
        user="User: {content}\n\nAssistant:",
        assistant=" {content}{eos_token}",
        description="DeepSeek LLM / V2 chat 'User: / Assistant:'",
    ),
    # deepseek-ai/DeepSeek-V3: the system text follows BOS with no separator.
    Template(
        name="deepseek3",
        prefix="{bos_token}",
        user="<｜User｜>{content}<｜Assistant｜>",
        assistant="{content}<｜end▁of▁sentence｜>",
        stop_words=("<｜end▁of▁sentence｜>",),
        description="DeepSeek V3 '<｜User｜> / <｜Assistant｜>' (non-thinking)",
    ),
]
