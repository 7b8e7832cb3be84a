"""The model runner: SchedulerOutput -> tensors -> forward -> sampled tokens.

It keeps its own per-request state, updated from the scheduler's diff-style output, so the same
scheduler could drive a runner in another process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sutra.config import EngineConfig
from sutra.core.output import RunnerOutput, SchedulerOutput
from sutra.engine.kv_transfer import KVBlocks, KVLayout, gather_blocks, scatter_blocks
from sutra.errors import RequestFailedError, SutraError
from sutra.model import hugepages
from sutra.model.attention import SeqSlice, build_metadata, kv_cache_shapes
from sutra.model.llama import LlamaModel
from sutra.model.loader import LoadedModel
from sutra.model.logprobs import TokenLogprobs, prompt_logprobs
from sutra.model.sampling import Sampler, SamplingRequest
from sutra.sampling_params import SamplingParams
from sutra.structured.compiler import compiler_for
from sutra.structured.matchers import ConstrainedRow, RequestGrammars

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunnerRequest:
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed: int
    params: SamplingParams
    generator: torch.Generator | None
    pooling: str | None = None  # an embedding request's "last" or "mean" ("default" resolved)
    pooled_from: int = 0  # the first position whose hidden state this state saw
    pooled_sum: torch.Tensor | None = None  # mean pooling: fp32 sum of the rows computed so far


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    # bf16 GEMMs are ~2-4x faster than fp32 on CPUs with AVX512-BF16/AMX, and much slower without.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def step_seed(seed: int, position: int) -> int:
    """A seeded request's randomness at each output position depends only on (seed, position), so
    its tokens survive preemption, migration and any choice of batch mates."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & 0x7FFF_FFFF_FFFF_FFFF


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        mc = config.model
        if mc.num_threads:
            torch.set_num_threads(mc.num_threads)
        self.device = resolve_device(mc.device)
        self.dtype = resolve_dtype(mc.dtype, self.device)
        self.arch = loaded.arch
        self.block_size = config.cache.block_size
        self.max_model_len = config.model.max_model_len or loaded.arch.max_position_embeddings
        positions = max(self.max_model_len, loaded.arch.max_position_embeddings)
        if loaded.weights is None:
            self.model = LlamaModel.random(
                loaded.arch, self.dtype, self.device, positions, mc.seed, mc.batch_invariant, mc.quantization
            )
        else:
            self.model = LlamaModel(
                loaded.arch,
                loaded.weights,
                self.dtype,
                self.device,
                positions,
                mc.batch_invariant,
                mc.quantization,
            )
        self.sampler = Sampler()
        self.default_pooling = mc.pooling
        self.eos_token_ids = tuple(loaded.tokenizer.eos_token_ids)
        # Structured outputs: the process's compiler for this tokenizer (the server compiles into its
        # cache before queueing), and a matcher per constrained request held here.
        self.structured = compiler_for(loaded.tokenizer, loaded.arch.vocab_size, config.structured)
        self.grammars = RequestGrammars(self.structured, self.eos_token_ids)
        self.requests: dict[str, RunnerRequest] = {}
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- KV cache tensors ------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        a = self.arch
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.arch
        k_shape, v_shape = kv_cache_shapes(num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        self.kv_caches = []  # drop the old cache before mapping the new one
        self.kv_caches = [
            (
                hugepages.zeros(k_shape, self.dtype, self.device),
                hugepages.zeros(v_shape, self.dtype, self.device),
            )
            for _ in range(a.num_layers)
        ]

    # ---- whole KV blocks in and out (live migration) --------------------------------------
    def kv_layout(self) -> KVLayout:
        a = self.arch
        return KVLayout.create(a.num_layers, a.num_kv_heads, a.head_dim, self.block_size, self.dtype)

    def export_blocks(self, block_ids: list[int]) -> KVBlocks:
        """Every layer's K and V of these blocks, as one contiguous CPU array."""
        return gather_blocks(self.kv_caches, block_ids, self.kv_layout())

    def import_blocks(self, block_ids: list[int], blocks: KVBlocks) -> None:
        """Write exported blocks into these blocks of this cache (in order). Raises
        KVLayoutMismatchError or ValueError, before writing anything, if they cannot go here."""
        scatter_blocks(self.kv_caches, block_ids, blocks, self.kv_layout())

    # ---- one step --------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.apply_diff(out)
        return self.run(out.num_scheduled_tokens)

    def apply_diff(self, out: SchedulerOutput) -> None:
        """Take in the scheduler's changes: new, resumed, finished and preempted requests, new blocks."""
        for rid in out.finished_request_ids + out.preempted_request_ids:
            self.requests.pop(rid, None)
            self.grammars.forget(rid)  # a resumed request replays its tokens into a new matcher
        for new in out.new_requests:
            seeded = new.sampling_params.seed is not None
            pooling = new.sampling_params.pooling
            self.requests[new.request_id] = RunnerRequest(
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                block_ids=list(new.block_ids),
                num_computed=new.num_computed_tokens,
                params=new.sampling_params,
                generator=torch.Generator(device=self.device) if seeded else None,
                pooling=self.default_pooling if pooling == "default" else pooling,
                pooled_from=new.num_computed_tokens,
            )
        for cached in out.cached_requests:
            st = self.requests[cached.request_id]
            st.block_ids.extend(cached.new_block_ids)
            if st.num_computed != cached.num_computed_tokens:
                raise RuntimeError(f"runner and scheduler disagree on request {cached.request_id}")

    @torch.inference_mode()
    def run(self, scheduled: dict[str, int]) -> RunnerOutput:
        """Compute these slices (request id -> tokens) of the current step and sample where a slice
        ends a request's known tokens (for a pooling request: return its embedding there). The
        requests' state changes only once nothing can raise any more, so a run that raised can be
        repeated with any subset of the slices (its KV writes are rewritten with the same values)."""
        if not scheduled:
            return RunnerOutput()
        # 1-token slices (decodes) go first: the attention backend batches them.
        order = sorted(scheduled.items(), key=lambda item: item[1] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        # (request, first row, rows) of the slices whose every row is needed: prompt logprobs, pooling
        whole_slices: list[tuple[str, int, int]] = []
        for rid, n in order:
            st = self.requests[rid]
            start = st.num_computed
            if st.params.needs_every_prompt_state:
                whole_slices.append((rid, len(input_ids), n))
            input_ids.extend(st.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slices.append(SeqSlice(st.block_ids, start, n))
            if start + n == len(st.token_ids) and st.pooling is None:  # pooling samples nothing
                sample_ids.append(rid)
                sample_rows.append(len(input_ids) - 1)
        # Before the forward pass: an internal grammar fault fails its request without costing one
        # (a spec that dead-ends is the client's: its row is left unmasked and accept() refuses it).
        masks = self._token_masks(sample_ids)
        meta = build_metadata(slices, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model.forward(ids, pos, meta, self.kv_caches)
        scored = self._prompt_logprobs(whole_slices, hidden)
        sums, embeddings, pool_failed = self._pool(whole_slices, hidden)
        sampled = None
        if sample_ids:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            sampled = self.sampler(
                logits, [self._sampling_request(rid, masks.get(rid)) for rid in sample_ids]
            )
        for rid, n in order:
            self.requests[rid].num_computed += n
        for rid, total in sums.items():
            self.requests[rid].pooled_sum = total
        result = RunnerOutput(prompt_logprobs=scored, embeddings=embeddings, failed=pool_failed)
        if sampled is None:
            return result
        for row, (rid, token, lp) in enumerate(
            zip(sample_ids, sampled.token_ids, sampled.logprobs, strict=True)
        ):
            if token < 0:
                result.failed[rid] = sampled.errors[row]
                continue
            if rid in masks and (error := self.grammars.accept(rid, token)) is not None:
                result.failed[rid] = error
                continue
            self.requests[rid].token_ids.append(token)
            result.sampled_token_ids[rid] = token
            if lp is not None:
                result.logprobs[rid] = lp
        return result

    def _prompt_logprobs(
        self, whole_slices: list[tuple[str, int, int]], hidden: torch.Tensor
    ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """For each slice of a request that asked for prompt logprobs: the logprob of every prompt
        token its rows predict (row p predicts token p + 1), keyed by the first predicted position."""
        scored: dict[str, tuple[int, list[TokenLogprobs]]] = {}
        for rid, row, n in whole_slices:
            st = self.requests[rid]
            start, top_n = st.num_computed, st.params.prompt_logprobs
            end = min(start + n, st.num_prompt_tokens - 1)  # the last prompt token predicts an output
            if top_n is not None and start < end:
                targets = st.token_ids[start + 1 : end + 1]
                rows = hidden[row : row + end - start]
                scored[rid] = (start + 1, prompt_logprobs(self.model.compute_logits, rows, targets, top_n))
        return scored

    def _pool(
        self, whole_slices: list[tuple[str, int, int]], hidden: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], dict[str, SutraError]]:
        """For the pooling requests of this step: mean pooling's running sums after it, and the
        L2-normalized embedding of each request whose prompt it completes. Nothing is stored here, so
        a run that raises leaves every sum as it was; run() keeps the sums once nothing can raise."""
        sums: dict[str, torch.Tensor] = {}
        vectors: dict[str, torch.Tensor] = {}
        failed: dict[str, SutraError] = {}
        for rid, row, n in whole_slices:
            st = self.requests[rid]
            if st.pooling is not None:
                rows = hidden[row : row + n]
                done = st.num_computed + n == len(st.token_ids)
                if st.pooling == "mean":
                    total = rows.float().sum(0)
                    if st.pooled_sum is not None:
                        total += st.pooled_sum
                    if not done:
                        sums[rid] = total
                    elif st.pooled_from != 0:  # its first rows were computed elsewhere (it moved)
                        failed[rid] = RequestFailedError(
                            "mean pooling needs every prompt token's hidden state, and this request's "
                            "first tokens were computed on another instance"
                        )
                    else:
                        vectors[rid] = total / len(st.token_ids)
                elif done:
                    vectors[rid] = rows[-1].float()
        if not vectors:
            return sums, {}, failed
        # vLLM normalizes decoder models' embeddings by default: cosine similarity is then a dot product.
        normalized = F.normalize(torch.stack(list(vectors.values())), dim=-1).cpu().tolist()
        return sums, dict(zip(vectors, normalized, strict=True)), failed

    def _token_masks(self, sample_ids: list[str]) -> dict[str, torch.Tensor]:
        """The token bitmask row of each constrained request sampled in this step; none otherwise."""
        rows = []
        for rid in sample_ids:
            st = self.requests[rid]
            if st.params.structured_outputs is not None:
                rows.append(
                    ConstrainedRow(rid, st.params.structured_outputs, st.token_ids, st.num_prompt_tokens)
                )
        return self.grammars.masks(rows) if rows else {}

    def _sampling_request(self, rid: str, allowed_tokens: torch.Tensor | None = None) -> SamplingRequest:
        st = self.requests[rid]
        if st.generator is not None:
            st.generator.manual_seed(step_seed(st.params.seed, len(st.token_ids) - st.num_prompt_tokens))
        num_output = len(st.token_ids) - st.num_prompt_tokens
        banned: tuple[int, ...] = ()
        if num_output < st.params.min_tokens:
            eos = () if st.params.ignore_eos else self.eos_token_ids
            banned = (*eos, *st.params.stop_token_ids)
        return SamplingRequest(
            params=st.params,
            prompt_token_ids=st.token_ids[: st.num_prompt_tokens],
            output_token_ids=st.token_ids[st.num_prompt_tokens :],
            generator=st.generator,
            banned_token_ids=banned,
            allowed_tokens=allowed_tokens,
        )
