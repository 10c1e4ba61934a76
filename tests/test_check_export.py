"""`qatune check`'s export check on either family: the export is loaded by transformers'
AutoModelForCausalLM (the class its config.json names) and compared, logit for logit, with qatune's
own load of the same folder; a difference beyond rounding FAILs."""

from __future__ import annotations

import pytest
import torch
from tests.test_llama import hf_dirs  # noqa: F401  (the fixture: random folders written by transformers)

from qatune.check import CheckReport, check_export
from qatune.data.example import IGNORE, EncodedExample
from qatune.model import families

IDS = [3, 17, 99, 200, 5, 64, 128, 7, 250, 1]
EXAMPLE = EncodedExample(IDS, [IGNORE] * 5 + IDS[5:])


@pytest.mark.parametrize(("case", "hf_class"), [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_a_llama_family_export_passes_against_its_own_transformers_class(hf_dirs, case, hf_class):  # noqa: F811
    report = CheckReport()
    check_export(report, hf_dirs(case), EXAMPLE)
    [result] = report.results
    assert result.ok, result.detail
    assert f"transformers {hf_class} logits vs qatune's" in result.detail


def test_a_gpt2_export_still_passes(hf_tiny_dir):
    report = CheckReport()
    check_export(report, hf_tiny_dir, EXAMPLE)
    [result] = report.results
    assert result.ok and "transformers GPT2LMHeadModel logits" in result.detail, result.detail


def test_logits_that_differ_fail(hf_dirs, monkeypatch):  # noqa: F811
    load = families.from_pretrained

    def off_by_a_little(folder, **kw):
        model = load(folder, **kw)
        with torch.no_grad():
            model.norm.weight.add_(0.01)  # the final norm: every logit moves
        return model

    monkeypatch.setattr(families, "from_pretrained", off_by_a_little)
    report = CheckReport()
    check_export(report, hf_dirs("llama"), EXAMPLE)
    assert not report.results[0].ok and "max difference" in report.results[0].detail
