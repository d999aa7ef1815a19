"""Smaller families: GLM-4, Baichuan 2, Cohere Command-R."""

from tasks.templates.base import Template

TEMPLATES = [
    # THUDM/glm-4-9b-chat: a turn ends where the next role token starts; as LlamaFactory's efficient_eos, the
    # model learns to stop from an EOS label where each later prompt starts, and EOS closes the conversation.
    Template(
        name="glm4",
        prefix="[gMASK]<sop>",
        system="<|system|>\n{content}",
        user="<|user|>\n{content}<|assistant|>",
        assistant="\n{content}",
        observation="<|observation|>\n{content}<|assistant|>",
        function="{content}",  # GLM-4 writes the tool name right after <|assistant|>, then '\n' and the arguments
        tool_format="glm4",
        suffix="{eos_token}",
        efficient_eos=True,
        stop_words=("<|user|>", "<|observation|>"),
        description="GLM-4 chat '<|user|> / <|assistant|>' after [gMASK]<sop>",
    ),
    # baichuan-inc/Baichuan2-*-Chat: reserved tokens 106/107 mark the user and assistant; no end token.
    Template(
        name="baichuan2",
        user="<reserved_106>{content}<reserved_107>",
        assistant="{content}",
        suffix="{eos_token}",
        description="Baichuan 2 chat '<reserved_106> ... <reserved_107>'",
    ),
    # CohereForAI/c4ai-command-r-v01 (default template, without tools or documents).
    Template(
        name="cohere",
        prefix="{bos_token}",
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        assistant="{content}<|END_OF_TURN_TOKEN|>",
        stop_words=("<|END_OF_TURN_TOKEN|>",),
        description="Cohere Command-R / R+ turn tokens",
    ),
    # zai-org/GLM-4.5 (LlamaFactory's glm4_moe): GLM-4 turns as a reasoning template with LlamaFactory's
    # thinking words; the published template writes '\n<think></think>' before every reply instead.
    Template(
        name="glm4_moe",
        prefix="[gMASK]<sop>",
        system="<|system|>\n{content}",
        user="<|user|>\n{content}<|assistant|>",
        assistant="\n{content}",
        observation="<|observation|>\n{content}<|assistant|>",
        function="{content}",
        tool_format="glm4",
        suffix="{eos_token}",
        efficient_eos=True,
        thought_words=("<think>\n", "\n</think>\n\n"),
        stop_words=("<|user|>", "<|observation|>"),
        description="GLM-4.5 / 4.6 (MoE) chat with <think> blocks (LlamaFactory's rendering)",
    ),
]
