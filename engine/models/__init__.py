"""Model classes by config.json model_type."""

from engine.models.llama import LlamaForCausalLM

MODELS = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}


def model_class(model_type: str):
    return MODELS[model_type]
