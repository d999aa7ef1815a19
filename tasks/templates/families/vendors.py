"""Single-template families: LG EXAONE, AllenAI OLMo, Tencent Hunyuan."""

from tasks.templates.base import Template

TEMPLATES = [
    # LGAI-EXAONE/EXAONE-3.5-*-Instruct: the published template writes an empty system block when the
    # conversation has none (LlamaFactory writes nothing); replies end with [|endofturn|] (its EOS).
    Template(
        name="exaone",
        system="[|system|]{content}[|endofturn|]\n",
        empty_system=True,
        user="[|user|]{content}\n[|assistant|]",
        assistant="{content}[|endofturn|]\n",
        stop_words=("[|endofturn|]",),
        description="EXAONE 3.x '[|user|] / [|assistant|]' turns",
    ),
    # allenai/OLMo-7B-Instruct (LlamaFactory's olmo): EOS opens the text, each reply ends with EOS.
    Template(
        name="olmo",
        prefix="{eos_token}",
        user="<|user|>\n{content}<|assistant|>\n",
        assistant="{content}{eos_token}",
        description="OLMo instruct '<|user|> / <|assistant|>' after EOS",
    ),
    # tencent/Hunyuan-7B-Instruct (LlamaFactory's hunyuan).
    Template(
        name="hunyuan",
        prefix="<|startoftext|>",
        system="{content}<|extra_4|>",
        user="{content}<|extra_0|>",
        assistant="{content}<|eos|>",
        stop_words=("<|eos|>",),
        description="Hunyuan '<|extra_0|>' turns",
    ),
]
