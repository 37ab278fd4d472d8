"""scripts/check-layers: the crate's own files pass, and a circle of imports, however it is
written (a child importing its `mod.rs`, a `crate::` path in a body, a sibling through others),
fails with the files and the imports that close it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check-layers"


def check(src):
    return subprocess.run([sys.executable, str(SCRIPT), str(src)], capture_output=True, text=True)


def tree(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_crate_has_no_circle():
    r = check(ROOT / "src")
    assert r.returncode == 0, r.stderr
    assert "no circle" in r.stdout


def test_layers_that_point_down_pass(tmp_path):
    src = tree(
        tmp_path,
        {
            "lib.rs": "pub mod a;\npub mod b;\n",
            "a/mod.rs": "mod base;\nmod top;\npub use top::Top;\n",
            "a/base.rs": "pub struct Base;\n",
            "a/top.rs": "use super::base::Base;\npub struct Top(Base);\n",
            "b.rs": "use crate::a::Top;\n",
        },
    )
    r = check(src)
    assert r.returncode == 0, r.stderr


def test_a_child_importing_its_mod_rs_is_a_circle(tmp_path):
    src = tree(
        tmp_path,
        {
            "lib.rs": "pub mod a;\n",
            "a/mod.rs": "mod top;\npub use top::Top;\npub struct Base;\n",
            "a/top.rs": "use super::Base;\npub struct Top(Base);\n",
        },
    )
    r = check(src)
    assert r.returncode == 1
    assert "these files import each other: a, a::top" in r.stderr
    assert "a::top -> a" in r.stderr


def test_a_path_in_a_body_and_a_longer_circle_are_found(tmp_path):
    src = tree(
        tmp_path,
        {
            "lib.rs": "pub mod x;\npub mod y;\npub mod z;\n",
            "x.rs": "use crate::y::{Y, other::{Deep}};\npub struct X;\n",
            "y/mod.rs": "pub mod other;\npub struct Y;\n",
            "y/other.rs": "pub struct Deep;\nfn f() { let _ = crate::z::Z; }\n",
            "z.rs": "pub struct Z;\nfn g() -> crate::x::X { crate::x::X }\n",
        },
    )
    r = check(src)
    assert r.returncode == 1
    assert "these files import each other: x, y::other, z" in r.stderr


def test_unit_tests_are_left_out(tmp_path):
    src = tree(
        tmp_path,
        {
            "lib.rs": "pub mod a;\npub mod b;\n",
            "a.rs": "pub struct A;\n#[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n",
            "b.rs": "use crate::a::A;\npub struct B(A);\n",
        },
    )
    r = check(src)
    assert r.returncode == 0, r.stderr
