"""From logits to tokens: sampling parameters, the sampler (penalties, top-k/p, min-p, seeded
draws, logprobs) and structured-output grammar masks."""
