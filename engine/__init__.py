"""What every role shares: the model (Llama family, tensor-parallel layers, attention over
packed and paged KV), its config, weights (safetensors or GGUF) and tokenizer, the paged KV
cache and its block manager, sampling and stop rules, the message types that cross process
boundaries, and the resolved deployment config tree. Imports no role package."""
