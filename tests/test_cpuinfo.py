"""engines.cpuinfo: /proc/cpuinfo parsing and the precision ``auto`` rule, on fake flag sets of real CPUs."""

from __future__ import annotations

import pytest

from engines import BackendUnavailable
from engines.cpuinfo import (
    bf16_isa,
    choose_precision,
    int8_isa,
    parse_cpuinfo,
    read_cpuinfo,
    resolve_precision,
)

# flag subsets as /proc/cpuinfo lists them on these parts (inference-relevant flags plus some noise)
SAPPHIRE_RAPIDS = {"sse4_2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                   "amx_int8"}
COOPER_LAKE = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
CASCADE_LAKE = {"avx2", "avx512f", "avx512_vnni"}
ALDER_LAKE = {"avx2", "avx_vnni"}
EPYC_ZEN3 = {"sse4_2", "avx", "avx2", "fma", "vaes"}  # this team's AVX2-only machine
OLD_ATOM = {"sse4_2"}

CPU = ("openvino", ("fp32", "bf16", "int8"))
ORT = ("onnxruntime", ("fp32", "int8"))
WITH_INT8 = {"fp32", "int8"}
FP32_ONLY = {"fp32"}


def test_parse_cpuinfo_reads_model_flags_and_cores():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
            "flags\t\t: fpu sse4_2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
            "flags\t\t: fpu sse4_2 avx avx2 fma\n")
    info = parse_cpuinfo(text)
    assert info.model == "AMD EPYC 7B13" and info.cores == 2
    assert info.isa == ("avx2",)
    assert info.summary() == "AMD EPYC 7B13; 2 logical CPUs; ISA: avx2"


def test_parse_cpuinfo_orders_features_best_first():
    info = parse_cpuinfo("model name: Xeon\nflags: " + " ".join(sorted(SAPPHIRE_RAPIDS)) + "\n")
    assert info.isa == ("amx_int8", "amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def test_parse_cpuinfo_without_flags():
    info = parse_cpuinfo("")
    assert info.model == "unknown CPU" and info.isa == () and "ISA: none of" in info.summary()


def test_read_cpuinfo_here_and_missing_file(tmp_path):
    here = read_cpuinfo()
    assert here.model and here.summary().startswith(here.model)
    assert read_cpuinfo(tmp_path / "no-such-file").flags == frozenset()


@pytest.mark.parametrize("flags, int8, bf16", [
    (SAPPHIRE_RAPIDS, "amx_int8", "amx_bf16"),
    (COOPER_LAKE, "avx512_vnni", "avx512_bf16"),
    (CASCADE_LAKE, "avx512_vnni", None),
    (ALDER_LAKE, "avx_vnni", None),
    (EPYC_ZEN3, "avx2", None),
    (OLD_ATOM, None, None),
])
def test_best_isa(flags, int8, bf16):
    assert int8_isa(flags) == int8 and bf16_isa(flags) == bf16


@pytest.mark.parametrize("flags, carried, backend, expected, because", [
    (SAPPHIRE_RAPIDS, WITH_INT8, CPU, "int8", "amx_int8"),
    (SAPPHIRE_RAPIDS, FP32_ONLY, CPU, "bf16", "amx_bf16"),
    (SAPPHIRE_RAPIDS, FP32_ONLY, ORT, "fp32", "no INT8 model"),
    (SAPPHIRE_RAPIDS, WITH_INT8, ORT, "int8", "amx_int8"),
    (COOPER_LAKE, FP32_ONLY, CPU, "bf16", "avx512_bf16"),
    (CASCADE_LAKE, WITH_INT8, CPU, "int8", "avx512_vnni"),
    (CASCADE_LAKE, FP32_ONLY, CPU, "fp32", "no native BF16"),
    (ALDER_LAKE, WITH_INT8, ORT, "int8", "avx_vnni"),
    (EPYC_ZEN3, WITH_INT8, CPU, "int8", "avx2"),
    (EPYC_ZEN3, FP32_ONLY, CPU, "fp32", "no INT8 model in the bundle; no native BF16"),
    (OLD_ATOM, WITH_INT8, CPU, "fp32", "no INT8 dot products"),
])
def test_choose_precision(flags, carried, backend, expected, because):
    precision, why = choose_precision(flags, carried, backend[1])
    assert precision == expected and because in why


@pytest.mark.parametrize("verified, expected, because", [
    (WITH_INT8, "int8", "guard-checked INT8 model and the CPU has avx2"),
    (FP32_ONLY, "fp32", "the bundle's INT8 model has not passed the accuracy guard"),
])
def test_auto_picks_int8_only_once_it_passed_the_guard(verified, expected, because):
    precision, why = choose_precision(EPYC_ZEN3, WITH_INT8, CPU[1], verified)
    assert precision == expected and because in why
    precision, why = choose_precision(SAPPHIRE_RAPIDS, WITH_INT8, CPU[1], verified)
    assert precision == ("int8" if expected == "int8" else "bf16") and because.split(" and")[0] in why


def test_resolve_precision_default_auto_and_explicit():
    assert resolve_precision(None, WITH_INT8, CPU[1], "openvino") == ("fp32", "default")
    assert resolve_precision("auto", WITH_INT8, CPU[1], "openvino", flags=SAPPHIRE_RAPIDS)[0] == "int8"
    assert resolve_precision("auto", FP32_ONLY, CPU[1], "openvino", flags=EPYC_ZEN3)[0] == "fp32"
    unchecked = dict(flags=EPYC_ZEN3, verified=FP32_ONLY)  # int8 carried, guard not passed
    assert resolve_precision("auto", WITH_INT8, CPU[1], "openvino", **unchecked)[0] == "fp32"
    assert resolve_precision("int8", WITH_INT8, CPU[1], "openvino", **unchecked)[0] == "int8"  # asked for
    assert resolve_precision("bf16", FP32_ONLY, CPU[1], "openvino")[0] == "bf16"  # from the FP32 graph
    assert resolve_precision("int8", WITH_INT8, ORT[1], "onnxruntime")[0] == "int8"


@pytest.mark.parametrize("requested, carried, backend, reason", [
    ("int8", FP32_ONLY, CPU, "carries no int8 model.*edge-engines quantize"),
    ("bf16", WITH_INT8, ORT, "runs fp32, int8 \\(or auto\\), not 'bf16'"),
    ("fp16", WITH_INT8, CPU, "not 'fp16'"),
])
def test_resolve_precision_refuses(requested, carried, backend, reason):
    with pytest.raises(BackendUnavailable, match=reason):
        resolve_precision(requested, carried, backend[1], backend[0])
