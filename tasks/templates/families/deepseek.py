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
    # deepseek-ai/DeepSeek-R1 (and its distills): V3's turns as a reasoning template. The published
    # template drops every thinking block; as LlamaFactory does, the last reply keeps its block (or an
    # empty one) so the model learns to reason, and replies in history lose theirs.
    Template(
        name="deepseekr1",
        prefix="{bos_token}",
        user="<｜User｜>{content}<｜Assistant｜>",
        assistant="{content}<｜end▁of▁sentence｜>",
        thought_words=("<think>\n", "\n</think>\n\n"),
        stop_words=("<｜end▁of▁sentence｜>",),
        description="DeepSeek R1 '<｜User｜> / <｜Assistant｜>' with <think> blocks",
    ),
    # deepseek-ai/deepseek-coder-*-instruct (the template published with deepseek-coder-33b-instruct): the
    # default system prompt is written only without a system, spelt 'Deepseek' and ending 'refuse to
    # answer\n' as published (LlamaFactory writes 'DeepSeek' and adds a full stop). The published generation
    # prompt is '### Response:\n', so the newline belongs to the prompt and the reply is content + '\n<|EOT|>\n'
    # (LlamaFactory opens the reply with the newline instead; the rendered text is the same).
    Template(
        name="deepseekcoder",
        prefix="{bos_token}",
        user="### Instruction:\n{content}\n### Response:\n",
        assistant="{content}\n<|EOT|>\n",
        default_system="You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
        "Deepseek Company, and you only answer questions related to computer science. For politically "
        "sensitive questions, security and privacy issues, and other non-computer science questions, you will "
        "refuse to answer\n",
        stop_words=("<|EOT|>",),
        description="DeepSeek Coder instruct '### Instruction: / ### Response:'",
    ),
]
