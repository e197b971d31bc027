"""Every built-in DiT adapter passes the adapter contract suite on a tiny pipeline of its
architecture, and the suite fails an adapter with a planted bug."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from calibri.plugins.dit import tiny, tiny_extra  # noqa: E402
from calibri.plugins.dit.adapters import FluxAdapter, SanaAdapter, _modulation  # noqa: E402
from calibri.plugins.dit.sites import Gate  # noqa: E402
from calibri.plugins.dit.testing import AdapterContract, check_adapter_contract, contract_checks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

NO_BINNING = {"use_resolution_binning": False}  # PixArt and Sana: keep the requested 32x32


class TestFluxAdapter(AdapterContract):
    pipeline_factory = staticmethod(tiny.tiny_flux_pipeline)


class TestSD3Adapter(AdapterContract):
    pipeline_factory = staticmethod(tiny.tiny_sd3_pipeline)


class TestQwenImageAdapter(AdapterContract):
    pipeline_factory = staticmethod(tiny.tiny_qwen_pipeline)


class TestPixArtAdapter(AdapterContract):
    pipeline_factory = staticmethod(tiny_extra.tiny_pixart_pipeline)
    call_options = NO_BINNING


class TestSanaAdapter(AdapterContract):
    pipeline_factory = staticmethod(tiny_extra.tiny_sana_pipeline)
    call_options = NO_BINNING


class TestChromaAdapter(AdapterContract):
    pipeline_factory = staticmethod(tiny_extra.tiny_chroma_pipeline)


# -- planted bugs ------------------------------------------------------------------------------------
class ShiftNotGateFlux(FluxAdapter):
    """Folds the single-stream gates into the shift rows of the modulation (chunk 0, not 2)."""

    def gates(self, model):
        return [Gate(g.group, g.index, g.stream, g.branch,
                     _modulation(g.ref.module, 1, 0, 3) if g.group == "single" else g.ref)
                for g in super().gates(model)]


class FlowTimeFlux(FluxAdapter):
    """Believes FLUX gets the scheduler's 0–1000 timesteps."""

    timestep_max = 1000.0


class BatchlessSana(SanaAdapter):
    """Forgets that Sana batches CFG."""

    cfg_batched = False


class TestPlantedBugs:
    def _contract(self, adapter_class, factory=tiny.tiny_flux_pipeline, options=None):
        return type("Planted", (AdapterContract,), {"pipeline_factory": staticmethod(factory),
                                                    "adapter_class": adapter_class,
                                                    "call_options": options or {}})()

    def test_a_wrong_linear_chunk_fails_the_bake_check(self):
        contract = self._contract(ShiftNotGateFlux)
        contract.test_identity_is_bit_exact()  # the hooks are right: only baking goes wrong
        with pytest.raises(AssertionError, match="bake"):
            contract.test_bake_matches_the_hooks()

    def test_a_wrong_timestep_max_fails_the_time_bucket_check(self):
        contract = self._contract(FlowTimeFlux)
        with pytest.raises(AssertionError, match="timestep_max is 1000"):
            contract.test_time_buckets_follow_timestep_max()

    def test_a_wrong_cfg_batching_fails_the_ensemble_check(self):
        contract = self._contract(BatchlessSana, tiny_extra.tiny_sana_pipeline, NO_BINNING)
        with pytest.raises((AssertionError, RuntimeError)):
            contract.test_ensemble_at_its_initial_values_is_the_stock_pipeline()

    def test_check_adapter_contract_names_the_failing_check(self):
        with pytest.raises(AssertionError, match="^test_bake_matches_the_hooks: bake"):
            check_adapter_contract(tiny.tiny_flux_pipeline, adapter_class=ShiftNotGateFlux)


def test_the_runner_lists_every_check():
    assert contract_checks() == [name for name in dir(AdapterContract) if name.startswith("test_")] or \
        sorted(contract_checks()) == sorted(name for name in dir(AdapterContract) if name.startswith("test_"))
    assert len(contract_checks()) == 7
