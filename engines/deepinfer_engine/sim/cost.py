"""Step time of the simulated engine.

    step = overhead + prefill_per_token x (uncached prompt tokens computed in the step)
                    + sum over decoding sequences of (decode_per_seq + per_ctx x context)

Defaults, for a 7-8B model (Llama-3.1-8B, bf16) served by vLLM on one H100 80 GB SXM:

- `overhead` 6 ms. A decode step at batch 1 reads all 16 GB of weights from HBM
  (3.35 TB/s: ~4.8 ms) plus scheduling, sampling and CUDA-graph launch; vLLM measures an
  inter-token latency of about 6-7 ms (~150 tokens/s) for one 8B sequence on an H100.
- `prefill_per_token` 40 us. A token costs ~2 x 8e9 = 16 GFLOP; at ~40% of the H100's
  989 dense bf16 TFLOP/s that is ~25,000 prompt tokens/s, in line with measured vLLM
  prefill throughput for 8B models (20-30k tokens/s), i.e. ~86 ms to prefill 2,000 tokens.
- `decode_per_seq` 30 us. Each extra sequence in a decode batch adds its share of the
  matmuls (16 GFLOP, ~30 us at the rates above once the batch is compute-bound) and of
  sampling.
- `per_ctx` 40 us per 1,000 context tokens. Attention reads the sequence's KV cache:
  32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 128 KiB per token, so 1,000
  tokens are 131 MB, ~39 us at 3.35 TB/s.

Together: 256 sequences with 1,000 tokens of context decode in ~24 ms per step, ~10,700
output tokens/s, which matches published vLLM throughput for 8B models on one H100.

`speed` divides every duration: `--speed 10` runs the same schedule ten times faster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    """Durations in seconds (already divided by the speed-up)."""

    overhead_s: float = 0.006
    prefill_per_token_s: float = 40e-6
    decode_per_seq_s: float = 30e-6
    decode_per_ctx_token_s: float = 40e-9

    @classmethod
    def from_knobs(
        cls,
        step_overhead_ms: float = 6.0,
        prefill_us_per_token: float = 40.0,
        decode_us_per_seq: float = 30.0,
        decode_us_per_1k_context: float = 40.0,
        speed: float = 1.0,
    ) -> CostModel:
        if speed <= 0:
            raise ValueError("speed must be positive")
        return cls(
            overhead_s=step_overhead_ms / 1e3 / speed,
            prefill_per_token_s=prefill_us_per_token / 1e6 / speed,
            decode_per_seq_s=decode_us_per_seq / 1e6 / speed,
            decode_per_ctx_token_s=decode_us_per_1k_context / 1e9 / speed,
        )

    def step_time(self, prefill_tokens: int, decode_seqs: int, decode_context: int) -> float:
        """Duration of one step computing `prefill_tokens` prompt tokens and one token for
        each of `decode_seqs` sequences holding `decode_context` tokens in all."""
        return (
            self.overhead_s
            + self.prefill_per_token_s * prefill_tokens
            + self.decode_per_seq_s * decode_seqs
            + self.decode_per_ctx_token_s * decode_context
        )
