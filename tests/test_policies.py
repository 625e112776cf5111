"""The Policy model, policy files, `sandbox policy check`, and failing closed on missing layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib

import pydantic
import pytest

from sandbox import ConfinementUnavailable, PolicyViolation, Sandbox
from sandbox.policies import LAYERS, Policy, PolicyFileError, load_policies
from sandbox.profile import HostSupport, build_profile
from tests.conftest import IS_ROOT, REPO

POLICY_DIR = REPO / "policies"


def test_unknown_fields_are_rejected_by_name():
    with pytest.raises(pydantic.ValidationError) as info:
        Policy(wall_time=3)
    assert info.value.errors()[0]["loc"] == ("wall_time",)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("wall_time_s", 0, "greater than 0"),
        ("memory_mb", 8, "greater than or equal to 64"),
        ("allowed_modules", ["json", "not a module"], "'not a module'"),
        ("denied_modules", ["os.*.x"], "'os.*.x'"),
        ("env", ["OK_NAME", "BAD-NAME"], "'BAD-NAME'"),
        ("mounts", [{"source": "relative/path", "target": "/data"}], "'relative/path'"),
        ("mounts", [{"source": "/srv", "target": "/data/../etc"}], "'..'"),
        ("mounts", [{"source": "/a", "target": "/data"}, {"source": "/b", "target": "/data/"}], "two mounts on one"),
        ("mounts", [{"source": "/a", "target": "/data"}, {"source": "/b", "target": "/data/x"}], "lies inside"),
        ("mounts", [{"source": "/a", "target": "/data", "mode": "rw"}], "mode"),
        ("removed_builtins", ["__import__"], "'__import__'"),
        ("required_layers", ["seccomp", "teleport"], "teleport"),
        ("filesystem", "everything", "scratch"),
    ],
)
def test_validators_name_the_field_and_the_bad_value(field, value, fragment):
    with pytest.raises(pydantic.ValidationError) as info:
        Policy(**{field: value})
    error = info.value.errors()[0]
    assert error["loc"][0] == field
    assert fragment in str(info.value)


def test_readonly_paths_is_refused_with_the_mounts_line_that_replaces_it(tmp_path):
    with pytest.raises(
        pydantic.ValidationError, match=r'write mounts = \[\{source = "/srv/data", target = "/srv/data"\}'
    ):
        Policy(readonly_paths=["/srv/data"])
    policy_file = tmp_path / "old.toml"
    policy_file.write_text('[tenants.old]\nreadonly_paths = ["/opt/models"]\n')
    with pytest.raises(PolicyFileError, match=r"tenant 'old'.*readonly_paths was replaced by mounts"):
        load_policies(policy_file)


def test_mounts_read_from_toml_as_the_issue_writes_them(tmp_path):
    policy_file = tmp_path / "mounts.toml"
    policy_file.write_text(
        "[tenants.etl]\n"
        'mounts = [{source = "/srv/data", target = "/data"}, '
        '{source = "/srv/out", target = "/output", writable = true}]\n'
    )
    mounts = load_policies(policy_file)["etl"].mounts
    assert [(m.source, m.target, m.writable) for m in mounts] == [
        ("/srv/data", "/data", False),
        ("/srv/out", "/output", True),
    ]
    with pytest.raises(pydantic.ValidationError, match="allows no writable mount"):
        Policy(filesystem="readonly", mounts=mounts)


def test_reply_limit_must_cover_one_result():
    with pytest.raises(pydantic.ValidationError, match="max_reply_bytes must be at least max_result_bytes"):
        Policy(max_result_bytes=10_000, max_reply_bytes=5_000)


def test_defaults_are_the_safe_ones():
    p = Policy()
    assert p.network is False and p.allow_processes is False and p.required_layers == "auto"
    assert p.filesystem == "scratch" and p.env == [] and p.mounts == []
    assert p.max_out_files == 100 and p.max_out_files_bytes == 16 * 1024 * 1024
    for module in (
        "os",
        "sys",
        "subprocess",
        "socket",
        "ctypes",
        "importlib",
        "pickle",
        "marshal",
        "gc",
        "inspect",
        "signal",
        "multiprocessing",
        "threading",
        "pathlib",
        "shutil",
        "tempfile",
        "builtins",
        "code",
        "pty",
        "mmap",
        "resource",
    ):
        assert module in p.denied_modules and module not in p.allowed_modules
    for module in (
        "asyncio",
        "json",
        "math",
        "re",
        "datetime",
        "collections",
        "itertools",
        "functools",
        "statistics",
        "random",
        "decimal",
        "fractions",
        "typing",
        "dataclasses",
        "enum",
        "string",
        "textwrap",
        "uuid",
        "hashlib",
        "hmac",
        "base64",
        "time",
        "copy",
        "heapq",
        "bisect",
        "operator",
    ):
        assert module in p.allowed_modules


def test_the_bundled_default_file_documents_exactly_the_built_in_defaults():
    document = tomllib.loads((POLICY_DIR / "default.toml").read_text())
    assert load_policies(POLICY_DIR / "default.toml") == {"default": Policy()}
    documented = set(document["tenants"]["default"])
    commented_out = {"max_concurrency", "rate_per_s"}  # optional fields left unset, shown as comments
    assert documented | commented_out == set(Policy.model_fields)


def test_base_then_tenant_overrides_then_builtin_defaults(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        textwrap.dedent("""
        [base]
        wall_time_s = 7
        memory_mb = 512
        [tenants.alpha]
        memory_mb = 128
        allowed_modules = ["math", "json"]
        [tenants.beta]
    """)
    )
    policies = load_policies(path)
    assert policies["alpha"].wall_time_s == 7 and policies["alpha"].memory_mb == 128
    assert policies["alpha"].allowed_modules == ["math", "json"]
    assert policies["beta"].memory_mb == 512 and policies["beta"].cpu_time_s == Policy().cpu_time_s


def test_an_invalid_file_raises_one_error_naming_file_tenant_and_every_bad_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        textwrap.dedent("""
        [tenants.alpha]
        memory_mb = -1
        wall_time_s = "soon"
        colour = "blue"
        [tenants.beta]
        cpu_time_s = 1
    """)
    )
    with pytest.raises(PolicyFileError) as info:
        load_policies(path)
    problems = info.value.problems
    assert len(problems) == 3
    assert all(str(path) in p and "tenant 'alpha'" in p for p in problems)
    assert {p.split(": ")[2] for p in problems} == {
        "memory_mb",
        "wall_time_s",
        "unknown field 'colour'; policies/default.toml lists every field",
    }


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[tenant.alpha]\nmemory_mb = 128\n", "unknown top-level section 'tenant'"),
        ("[base]\nwall_time_s = 3\n", "no [tenants.NAME] table"),
        ("[tenants.alpha\n", "Expected ']'"),
        ("[base]\nwalltime = 3\n[tenants.a]\n", "[base]: unknown field 'walltime'; did you mean 'wall_time_s'?"),
    ],
)
def test_structural_errors_are_reported(tmp_path, text, fragment):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyFileError) as info:
        load_policies(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_a_directory_of_files_with_a_tenant_defined_twice(tmp_path):
    (tmp_path / "a.toml").write_text("[tenants.one]\n[tenants.two]\n")
    (tmp_path / "b.toml").write_text("[base]\nmemory_mb = 128\n[tenants.three]\n")
    assert set(load_policies(tmp_path)) == {"one", "two", "three"}
    assert load_policies(tmp_path)["three"].memory_mb == 128
    (tmp_path / "c.toml").write_text("[tenants.one]\n")
    with pytest.raises(PolicyFileError, match=r"tenant 'one' is already defined in .*a\.toml"):
        load_policies(tmp_path)
    with pytest.raises(PolicyFileError, match="no such file"):
        load_policies(tmp_path / "missing.toml")


def test_policy_check_command(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "sandbox", "policy", "check", str(POLICY_DIR / "tenants.example.toml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert "[tenants.free]" in ok.stdout and "OK: 4 tenant(s)" in ok.stdout
    assert "rate_per_s = 5.0" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants.x]\nmemory_mb = 1\n")
    failed = subprocess.run(
        [sys.executable, "-m", "sandbox", "policy", "check", str(bad)], capture_output=True, text=True, cwd=REPO
    )
    assert failed.returncode != 0
    assert "tenant 'x': memory_mb" in failed.stderr


async def test_a_sandbox_serves_the_tenants_of_a_policy_file():
    tenants = load_policies(POLICY_DIR / "tenants.example.toml")
    async with Sandbox(tenants=tenants, workers=2) as sb:
        r = await sb.run("import statistics\nm = statistics.mean([1, 2])", tenant="analytics")
        assert r.outputs == {"m": 1.5}
        with pytest.raises(PolicyViolation) as info:
            await sb.run("import statistics", tenant="free")
        assert info.value.tenant == "free"


def _host(off: dict[str, str]) -> HostSupport:
    return HostSupport({layer: off.get(layer, "on") for layer in LAYERS}, root=True, pid_namespace=True)


def test_a_required_layer_the_host_lacks_is_refused_with_its_name_and_reason():
    host = _host({"landlock": "off: this kernel has no landlock"})
    with pytest.raises(ConfinementUnavailable) as info:
        build_profile("t", Policy(required_layers=["seccomp", "landlock"]), host)
    assert info.value.layer == "landlock" and "no landlock" in info.value.reason
    assert "tenant 't'" in str(info.value)
    auto = build_profile("t", Policy(), host)
    assert "landlock" not in auto.required and "seccomp" in auto.required


def test_network_and_a_required_network_namespace_contradict():
    with pytest.raises(ConfinementUnavailable, match="allows network"):
        build_profile("t", Policy(network=True, required_layers=["netns"]), _host({}))


async def test_a_policy_requiring_an_unavailable_layer_makes_the_sandbox_refuse_to_start():
    """As an unprivileged user there is no cgroup layer; requiring it must fail closed."""
    if not IS_ROOT:
        with pytest.raises(ConfinementUnavailable) as info:
            async with Sandbox(Policy(required_layers=["cgroup"]), workers=1):
                pass
        assert info.value.layer == "cgroup"
        return
    script = textwrap.dedent("""
        import json
        from sandbox.unprivileged import call_as_user, interpreter_paths

        def attempt():
            import uvloop
            from sandbox import ConfinementUnavailable, Policy, Sandbox

            async def main():
                try:
                    async with Sandbox(Policy(required_layers=["cgroup", "seccomp"]), workers=1):
                        return {"outcome": "started"}
                except ConfinementUnavailable as exc:
                    return {"outcome": "refused", "layer": exc.layer, "message": str(exc)}
            return uvloop.run(main())

        print(json.dumps(call_as_user(attempt, 65534, interpreter_paths())))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "refused", report
    assert report["layer"] == "cgroup" and "cgroup" in report["message"]


def test_skipped_layers_are_neither_applied_nor_required():
    profile = build_profile("t", Policy(skip_layers=["landlock", "cgroup"]), _host({}))
    assert "landlock" not in profile.template["layers"] and "landlock" not in profile.required
    assert "seccomp" in profile.required
    with pytest.raises(pydantic.ValidationError, match="both in required_layers and in skip_layers"):
        Policy(required_layers=["landlock"], skip_layers=["landlock"])
