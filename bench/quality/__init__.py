"""Output quality, `pdserve eval-ppl`: the perplexity of a model setting (dtype, weight
quantization, KV-cache dtype) on the shipped public-domain text, computed through the paged KV
cache the decode pool runs (`ppl`), and greedy agreement with float32 on chat prompts
(`agreement`); `cli` runs the settings side by side."""
