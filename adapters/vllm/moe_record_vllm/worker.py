"""One vLLM worker's recording: the recorder, the tap on its model, the pass boundary, control.

Built right after the worker loads its model, before vLLM's profile run, Dynamo trace and
CUDA-graph capture, so those see the tap. The recorder starts disabled, so warm-up and
profile passes are never counted; the pass boundary and the valid-token count come from the
model runner's ``execute_model``, the one place real batches run, outside any traced region.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from moe_record_sdk import EngineInfo, Recorder, Topology, env
from moe_record_sdk.errors import RecorderError
from moe_record_sdk.schema import encode

from .layers import build_layer_map, moe_runners, sequence_parallel
from .tap import attach, is_tapped
from .version import DISTRIBUTION, check_version

log = logging.getLogger("vllm.moe_record")  # under vLLM's logger: its handlers print it


def _topology(vllm_config: Any, runner: Any) -> Topology:
    """This worker's place. TP ranks (and EP ranks within a DP rank) route the same tokens and PP
    stages hold disjoint layers: they share a token shard. DP ranks see disjoint tokens, and so do
    the TP ranks of sequence-parallel MoE (DP > 1 with expert parallelism, vLLM's default
    all-to-all): each routes its chunk of its DP rank's tokens, its own token shard."""
    from vllm.distributed import parallel_state as ps

    pc = vllm_config.parallel_config
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pp_group()
    dp_rank, dp_size = pc.data_parallel_rank, pc.data_parallel_size
    moe = runner.moe_config
    shard, shards = (
        (dp_rank * tp_size + tp_rank, dp_size * tp_size) if sequence_parallel(runner) else (dp_rank, dp_size)
    )
    return Topology(
        rank=(dp_rank * pp.world_size + pp.rank_in_group) * tp_size + tp_rank,
        world_size=dp_size * pp.world_size * tp_size,
        tp_rank=tp_rank,
        tp_size=tp_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        ep_rank=moe.ep_rank,
        ep_size=moe.ep_size,
        pp_rank=pp.rank_in_group,
        pp_size=pp.world_size,
        token_shard=shard,
        num_token_shards=shards,
    )


def _frozen(vllm_config: Any) -> bool:
    """Whether the forward is compiled or graph-captured: its Python was fixed at trace time."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    return cc.mode != CompilationMode.NONE or cc.cudagraph_mode != CUDAGraphMode.NONE


class WorkerRecording:
    """The recorder of one worker (one rank), tapped into its model.

    Parameters
    ----------
    worker:
        A vLLM worker whose model is loaded (``worker.model_runner.get_model()``).
    mode:
        The mode whose buffers are allocated now (default ``MOE_RECORD_MODE``, else ``stat``).
        Compiled and graph-captured engines cannot take new buffers later.
    """

    def __init__(self, worker: Any, mode: str | None = None) -> None:
        import vllm

        self.version = check_version()
        self.vllm_config = worker.vllm_config
        runner = worker.model_runner
        model = runner.get_model()
        mc = self.vllm_config.model_config
        self.layer_map = build_layer_map(
            model, num_layers=mc.get_total_num_hidden_layers(), model_name=str(mc.served_model_name or mc.model)
        )
        first = moe_runners(model)[0]
        self.topology = _topology(self.vllm_config, first)
        if any(r.do_naive_dispatch_combine for r in moe_runners(model)):
            log.warning(
                "moe-record-vllm: naive DP dispatch routes tokens of other ranks on this rank; counts under this "
                "layout are not verified"
            )
        device = self._device(model)
        self.frozen = _frozen(self.vllm_config)
        options = env.recorder_options()
        try:
            self.recorder = Recorder(
                device=device,
                mode=mode or env.mode(),
                engine=EngineInfo(name="vllm", version=vllm.__version__, adapter=DISTRIBUTION),
                topology=self.topology,
                **self.layer_map.recorder_kwargs(),
                **options,
            )
        except RecorderError as e:  # name the variables the user set, not Recorder's arguments
            given = [f"{env.VARIABLE_OF[k]}={v}" for k, v in options.items()]
            if not given:
                raise
            raise RecorderError(f"{e} (from {', '.join(given)})") from None
        # Real (unpadded) tokens of the pass being run; 0 outside execute_model, so dummy and
        # warm-up forwards (profile run, DP padding batches) count nothing even while recording.
        self.num_valid = torch.zeros((), dtype=torch.int64, device=device)
        self.model, self._runner = model, runner
        self.attach()
        log.info(
            "moe-record-vllm: tap on MoE layers %s of %d (experts %d, top_k %d), rank %d%s",
            list(self.layer_map.moe_layer_ids),
            self.layer_map.num_layers,
            self.layer_map.num_experts,
            self.layer_map.top_k,
            self.topology.rank,
            f"; unobserved layers {list(self.layer_map.unobserved_layer_ids)}"
            if self.layer_map.unobserved_layer_ids
            else "",
        )

    @staticmethod
    def _device(model: torch.nn.Module) -> torch.device:
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def attach(self) -> None:
        """Put the tap on the model and the pass boundary on the model runner."""
        # Sequence-parallel layers: this TP rank routes chunk tp_rank of the pass's tokens.
        chunk = self.topology.tp_rank
        self.attachment = attach(self.model, self.recorder, self.layer_map, self.num_valid, chunk)
        original = self._runner.execute_model
        recorder, num_valid = self.recorder, self.num_valid

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            # vLLM's model runner V2 (the GPU default) runs its dummy batches through
            # execute_model(..., dummy_run=True): no real tokens, no pass.
            n = 0 if kwargs.get("dummy_run") else scheduler_output.total_num_scheduled_tokens
            num_valid.fill_(n)
            try:
                return original(scheduler_output, *args, **kwargs)
            finally:
                num_valid.fill_(0)
                if n:
                    recorder.step()  # one boundary per forward pass; no forward when nothing was scheduled

        self._runner.execute_model = execute_model  # an instance attribute: detach deletes it

    def detach(self) -> None:
        """Remove the tap and the pass boundary: vLLM runs as without the plugin (an eager engine;
        a compiled one keeps the tap its graph traced)."""
        self.attachment.detach()
        vars(self._runner).pop("execute_model", None)

    # -- control (called through collective_rpc by string name) -----------------------------
    def _check_tap(self) -> None:
        """Layers whose capture slot another binder took after us are unobserved from now on."""
        lost = {
            r.layer_id
            for r in moe_runners(self.model)
            if r.layer_id in self.layer_map.moe_layer_ids and not is_tapped(r.router)
        }
        new = sorted(lost - set(self.recorder.unobserved_layers))
        if new:
            log.warning("moe-record-vllm: the capture slot of MoE layers %s was replaced after attach", new)
        # Computed afresh: a layer tapped again (detach, then attach) is observed again.
        self.recorder.unobserved_layers = sorted(set(self.layer_map.unobserved_layer_ids) | lost)

    def start(self, mode: str | None = None) -> dict[str, Any]:
        self._check_tap()
        if mode and mode != self.recorder.mode and self.frozen and not self.recorder.supports(mode):
            raise RecorderError(
                f"mode {mode!r}: this engine is compiled, so its recorder's buffers were fixed at start-up for mode "
                f"{self.recorder.mode!r}; start vLLM with MOE_RECORD_MODE={mode} (or --enforce-eager)"
            )
        self.recorder.start(mode)
        return self.status()

    def stop(self) -> dict[str, Any]:
        self.recorder.stop()
        return self.status()

    def dump(self, write: bool = False, fmt: str = "msgpack") -> bytes:
        """The window as bytes (``msgpack`` by default); ``write``: also save this rank's file,
        SGLang's ``.pt`` with a per-rank name, in the configured directory. A write that fails
        keeps the window for the next dump (the recorder writes before it clears)."""
        if not write:
            return encode(self.recorder.dump(), fmt)
        directory = env.dump_dir("vllm")
        try:
            os.makedirs(directory, exist_ok=True)
            dump = self.recorder.dump(directory, per_rank=True)
        except OSError as e:  # crosses collective_rpc as data (rpc.py), named
            raise RecorderError(f"cannot write the dump to {directory}: {e}; the recording is kept") from None
        return encode(dump, fmt)

    def status(self) -> dict[str, Any]:
        return {
            "rank": self.topology.rank,
            "moe_layer_ids": list(self.layer_map.moe_layer_ids),
            **self.recorder.status().to_dict(),
        }
