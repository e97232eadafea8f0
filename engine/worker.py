"""One rank of a model: its shard of the weights, its KV cache, and the forward step.

Every rank runs the same `execute(step)`; collectives inside the model join them. Rank 0 also
samples and returns the next tokens. The cache is paged and sized once at start-up; which blocks
a sequence uses comes with each step (the driver's engine.block_manager decides), so a rank keeps
no per-sequence state but the sampler's.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.cuda_graph import DecodeGraphs
from engine.engine_config import EngineConfig
from engine.executor.stats import set_rank_info
from engine.kv_cache import KVCache, block_bytes, num_kv_blocks
from engine.load_progress import LoadProgress, Report
from engine.models import model_class
from engine.sampler import Sampler
from engine.step import PendingOutput, StepInput, StepOutput
from engine.weights import Weights
from kernels.errors import QShardError
from parallel.state import ParallelContext
from quant import get_loader
from quant.base import layouts_dropped

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, ctx: ParallelContext, on_progress: Report | None = None):
        """on_progress(layers read, layers): called as the shard loads (executors watch start-up by it)."""
        self.config, self.ctx = config, ctx
        self.model_config = ModelConfig.from_dir(config.model_path)
        start = time.perf_counter()
        if config.load_format == "dummy":  # random weights of the config's shapes, made in place
            from engine.dummy import DummyWeights

            weights = DummyWeights(self.model_config, dtype=config.dtype, device=ctx.device, seed=config.seed)
        else:
            weights = Weights(config.model_path, dtype=config.dtype, device=ctx.device, rank=ctx.rank,
                              world_size=ctx.world_size)
        loader = get_loader(self.model_config.quantization_config)
        cls = model_class(self.model_config.model_type)
        # layouts_dropped: repacking backends keep one copy of the rank's weights (quant.base)
        with tqdm(total=self.model_config.num_hidden_layers, desc=f"loading rank {ctx.rank}",
                  disable=not config.progress or ctx.rank != 0, unit="layer") as bar, torch.inference_mode(), \
                layouts_dropped():
            progress = LoadProgress(bar, self.model_config.num_hidden_layers, on_progress)
            self.model = cls(self.model_config, weights, loader, ctx, config.dtype, ctx.device, progress=progress,
                             kernels=config.kernels)
        self.model.eval()
        self.weight_bytes_read = weights.bytes_read
        logger.info("rank %d loaded %s (%s) in %.1fs, %.1f MB read", ctx.rank, config.model_path,
                    loader.describe(), time.perf_counter() - start, weights.bytes_read / 2**20)
        self.num_kv_blocks = num_kv_blocks(config, self.model_config)
        if self.num_kv_blocks is None:  # CUDA without kv_cache_memory: what is left after a profiled forward
            self.num_kv_blocks = self._profile_kv_blocks()
        self.cache = KVCache(self.model_config.num_hidden_layers, self.model.num_local_kv_heads,
                             self.model_config.head_dim, config.dtype, ctx.device, self.num_kv_blocks,
                             config.block_size)
        set_rank_info(kv_cache_blocks=self.num_kv_blocks)  # the driver may read it back (engine.engine)
        logger.info("rank %d KV cache: %d blocks of %d positions, %.1f MB", ctx.rank, self.num_kv_blocks,
                    config.block_size, self.cache.bytes / 2**20)
        self.graphs = None
        if ctx.device.type == "cuda" and config.cuda_graphs:
            # graphs read a static block-table buffer; padding rows write into the scratch block
            self.graphs = DecodeGraphs(self.model, self.cache, min(config.max_num_seqs, config.cuda_graph_max_batch),
                                       max_blocks=-(-config.max_model_len // config.block_size), device=ctx.device)
        self.sampler = Sampler(config.seed) if ctx.rank == 0 else None
        self._last_tokens: torch.Tensor | None = None  # the last step's sampled tokens, on the device

    def _profile_kv_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization of the GPU after the weights and the peak of one
        forward of max_num_batched_tokens (no cache); every rank takes the smallest rank's count."""
        config, device = self.config, self.ctx.device
        tokens = min(config.max_num_batched_tokens, config.max_model_len)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            batch = ForwardBatch.build([[0] * tokens], [0], [0], device)
            self.model.compute_logits(self.model(batch, None))
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        spare = int(total * config.gpu_memory_utilization) - peak
        blocks = max(0, spare // block_bytes(config, self.model_config))
        blocks = min(blocks, config.max_num_seqs * -(-config.max_model_len // config.block_size))
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            count = torch.tensor([blocks], dtype=torch.int64)
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.ctx.cpu_group)
            blocks = int(count.item())
        if blocks < 1:
            raise RuntimeError(f"rank {self.ctx.rank}: no room for a KV block within gpu_memory_utilization="
                               f"{config.gpu_memory_utilization} (peak {peak / 2**30:.2f} GiB of "
                               f"{total / 2**30:.2f} GiB after one forward); raise it or set kv_cache_memory")
        logger.info("rank %d: %d KV blocks fit after a profiled forward (peak %.2f GiB)", self.ctx.rank, blocks,
                    peak / 2**30)
        return int(blocks)

    # -- the step -------------------------------------------------------------------------------

    def execute(self, step: StepInput) -> StepOutput | None:
        pending = self.launch(step)
        return None if pending is None else pending.result()

    @torch.inference_mode()
    def launch(self, step: StepInput) -> PendingOutput | None:
        """Run the step's forward and sampling without waiting for the GPU; rank 0's result comes
        from the returned PendingOutput (None on other ranks). A step
        with previous_rows takes its tokens from the previous step's sampled ones, on the device."""
        if self.sampler is not None:
            for seq_id in step.finished:
                self.sampler.forget(seq_id)
        if not step.seq_ids:
            return PendingOutput(StepOutput([])) if self.ctx.rank == 0 else None
        previous = self._previous_tokens(step) if step.previous_rows is not None else None
        self.cache.zero_new_blocks(step.block_tables)
        if self._graph_step(step):
            logits = self.graphs.run(None if previous is not None else [t[0] for t in step.token_ids],
                                     list(step.context_lens), step.block_tables, device_tokens=previous)
            if self.ctx.rank != 0:
                return None
            return self._sampled(logits, step)
        token_ids = step.token_ids if previous is None else [[t] for t in previous.tolist()]
        batch = ForwardBatch.build(token_ids, step.context_lens, step.block_tables, self.ctx.device,
                                   all_logits=step.prompt_logprobs)
        hidden = self.model(batch, self.cache)
        logits = self.model.compute_logits(hidden)
        if self.ctx.rank != 0:
            return None
        last = logits[batch.last_logit_row]
        if not any(step.prompt_logprobs) and all(step.samples(i) for i in range(len(step.seq_ids))):
            return self._sampled(last, step)
        self._last_tokens = None  # a step that leaves rows unsampled is never continued on the device
        tokens, logprobs = self._sample(last, step)
        return PendingOutput(StepOutput(tokens, logprobs, self._prompt_logprobs(logits, batch, step)))

    def _sampled(self, logits: torch.Tensor, step: StepInput) -> PendingOutput:
        sampled = self.sampler.sample_on_device(logits, step.seq_ids, step.sampling, step.penalties)
        self._last_tokens = sampled.tokens
        return PendingOutput(sampled=sampled)

    def _previous_tokens(self, step: StepInput) -> torch.Tensor:
        """The previous step's sampled tokens of step.previous_rows, on the device, without a sync."""
        previous, rows = self._last_tokens, step.previous_rows
        if self.ctx.world_size > 1 or self.ctx.rank != 0:
            raise QShardError("a step that takes the previous step's tokens on the device needs one rank")
        if previous is None or len(rows) != len(step.seq_ids) or (rows and max(rows) >= previous.numel()):
            raise QShardError(f"the step takes {len(step.seq_ids)} tokens from rows {rows} of the previous step, "
                              f"which sampled {0 if previous is None else previous.numel()} on the device")
        if rows == list(range(previous.numel())):
            return previous
        index = torch.tensor(rows, dtype=torch.long)
        if previous.is_cuda:  # pinned: the upload does not wait for the GPU's queue
            index = index.pin_memory()
        return previous.index_select(0, index.to(previous.device, non_blocking=True))

    def _sample(self, last: torch.Tensor, step: StepInput):
        """Sample the rows that sample this step; a prefill chunk before its prompt's end gets token
        -1 (its logits predict a prompt token) and draws nothing, so seeded draws do not depend on chunking."""
        rows = [i for i in range(len(step.seq_ids)) if step.samples(i)]
        if len(rows) == len(step.seq_ids):
            return self.sampler.sample(last, step.seq_ids, step.sampling, step.penalties)
        tokens, logprobs = [-1] * len(step.seq_ids), [None] * len(step.seq_ids)
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=last.device)
            got, got_lp = self.sampler.sample(last.index_select(0, index), [step.seq_ids[i] for i in rows],
                                              [step.sampling[i] for i in rows],
                                              [step.penalties[i] for i in rows] if step.penalties else None)
            for j, i in enumerate(rows):
                tokens[i] = got[j]
                logprobs[i] = got_lp[j] if got_lp else None
        return tokens, logprobs

    def _graph_step(self, step: StepInput) -> bool:
        """Decode-only steps that fit a captured graph replay it (the same choice on every rank)."""
        return (self.graphs is not None and self.graphs.can_run(len(step.seq_ids))
                and all(len(t) == 1 for t in step.token_ids) and not any(step.prompt_logprobs)
                and all(step.samples(i) for i in range(len(step.seq_ids))))

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, batch: ForwardBatch, step: StepInput):
        if not any(step.prompt_logprobs):
            return None
        # every asking sequence's rows and targets at once: one copy up, one copy down per step
        wanted = [i for i, want in enumerate(step.prompt_logprobs) if want]
        rows = [r for i in wanted for r in range(batch.logit_rows[i].start, batch.logit_rows[i].stop - 1)]
        targets = [t for i in wanted for t in step.token_ids[i][1:]]  # row r predicts the token after it
        index = torch.tensor([rows, targets], dtype=torch.long).to(logits.device)
        flat = logits[index[0]].float().log_softmax(-1).gather(-1, index[1][:, None]).squeeze(-1).tolist()
        out: list[list[float] | None] = [None] * len(step.prompt_logprobs)
        start = 0
        for i in wanted:
            n = len(step.token_ids[i]) - 1
            out[i], start = flat[start:start + n], start + n
        return out
