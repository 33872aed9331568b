"""The machine description every benchmark prints."""

from bench.host import cpu_from_cpuinfo, host_info

X86 = """processor\t: 0
model name\t: AMD EPYC 7B13
cpu MHz\t\t: 2445.404
flags\t\t: fpu sse4_2 avx avx2 fma
processor\t: 1
model name\t: another core
cpu MHz\t\t: 1200.0
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n"


def test_cpuinfo_gives_first_core_model_clock_and_widest_vector_extension():
    assert cpu_from_cpuinfo(X86) == {"cpu_model": "AMD EPYC 7B13", "cpu_mhz": 2445, "simd": "avx2"}
    avx512 = X86.replace("avx2 fma", "avx2 avx512f avx512bw")
    assert cpu_from_cpuinfo(avx512)["simd"] == "avx512f"
    assert cpu_from_cpuinfo(ARM) == {"cpu_model": None, "cpu_mhz": None, "simd": "asimd"}


def test_host_info_names_the_machine_and_package_versions():
    info = host_info("numpy", "no-such-package-facesynth")
    assert info["cpu_model"] and info["cpu_count"] >= 1
    versions = info["versions"]
    assert versions["numpy"].count(".") >= 1 and versions["no-such-package-facesynth"] is None
    assert 0 < info["python_loop_ns"] < 10_000


def test_package_versions_never_clobber_a_bench_field():
    result = {"ray": {"images_per_s": 3.5}, **host_info("ray")}
    assert result["ray"] == {"images_per_s": 3.5} and set(result["versions"]) == {"ray"}
