"""The UML kernel runner itself: commands, Python, processes, errors.

Addresses: 10.250.0.0/24 on a veth pair between the root namespace of UML
and the namespace kl-uml-t (inside UML only).
"""

from __future__ import annotations

import subprocess

import pytest

from kubelab.netlab.uml import UMLError, UMLKernel, UMLRemoteError


@pytest.mark.parametrize(
    ("argv", "rc", "out"),
    [
        (["sh", "-c", "echo hello"], 0, "hello\n"),
        (["sh", "-c", "exit 3"], 3, ""),
        (["uname", "-r"], 0, None),
    ],
    ids=["stdout", "status", "uname"],
)
def test_run_returns_status_and_output(uml, argv, rc, out):
    res = uml.run(argv)
    assert res.returncode == rc
    if out is not None:
        assert res.stdout == out
    else:
        assert res.stdout.strip() == uml.info["kernel"]


def test_run_feeds_stdin_and_env(uml):
    res = uml.run(["sh", "-c", 'cat; echo "$KL_X"'], input="in\n", env={"KL_X": "envval"})
    assert res.stdout == "in\nenvval\n"


def test_run_check_raises(uml):
    with pytest.raises(subprocess.CalledProcessError) as err:
        uml.run(["sh", "-c", "echo oops >&2; exit 7"], check=True)
    assert err.value.returncode == 7
    assert "oops" in err.value.stderr


def test_run_timeout_kills_inside(uml):
    with pytest.raises(subprocess.TimeoutExpired):
        uml.run(["sleep", "30"], timeout=0.5)
    assert uml.run(["pgrep", "-x", "sleep"]).returncode == 1


def test_is_a_different_kernel_with_ipvs(uml):
    assert uml.info["kernel"].startswith("6.1")
    assert "IP Virtual Server" in uml.run(["cat", "/proc/net/ip_vs"]).stdout
    # /run is private: the host's netns names are not visible inside.
    assert uml.run(["ip", "netns", "list"]).stdout.strip() == ""


def test_python_namespace_persists_and_returns_values(uml):
    uml.python("kl_counter = [1, 2]")
    assert uml.python("kl_counter.append(3)\nkl_counter") == [1, 2, 3]
    assert uml.python("import os\nos.uname().release") == uml.info["kernel"]
    assert uml.python("x = 1") is None


def test_python_error_carries_remote_traceback(uml):
    with pytest.raises(UMLRemoteError) as err:
        uml.python("def f():\n    raise ValueError('bad thing')\nf()")
    assert "bad thing" in str(err.value)
    assert "ValueError" in err.value.remote_traceback


def test_popen_serves_traffic_until_terminated(uml):
    """A long-lived server in a namespace, reached over a veth pair with a real client."""
    uml.sh(
        "ip netns add kl-uml-t\n"
        "ip link add kl-uml-a type veth peer name kl-uml-b netns kl-uml-t\n"
        "ip addr add 10.250.0.1/24 dev kl-uml-a && ip link set kl-uml-a up\n"
        "ip -n kl-uml-t addr add 10.250.0.2/24 dev kl-uml-b\n"
        "ip -n kl-uml-t link set kl-uml-b up && ip -n kl-uml-t link set lo up\n",
        check=True,
    )
    server = None
    try:
        server = uml.popen(
            ["ip", "netns", "exec", "kl-uml-t", "socat", "TCP-LISTEN:8080,reuseaddr,fork", "SYSTEM:echo from-netns"]
        )
        out = uml.run(
            ["sh", "-c", "for i in $(seq 50); do nc -w 2 10.250.0.2 8080 </dev/null && exit 0; sleep 0.1; done; exit 1"],
            timeout=60,
        )
        assert out.stdout.strip() == "from-netns", out
        assert server.poll() is None
        assert server.terminate() is not None
        assert server.poll() is not None
    finally:
        if server is not None:
            server.kill()
        uml.run(["ip", "netns", "delete", "kl-uml-t"])
        uml.run(["ip", "link", "delete", "kl-uml-a"])


def test_popen_captures_output(uml):
    proc = uml.popen(["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert proc.wait(30) == 4
    assert proc.stdout == "out\n"
    assert proc.stderr == "err\n"


def test_unknown_module_fails_boot_with_its_name():
    with pytest.raises(UMLError, match="kl_no_such_module"):
        with UMLKernel(modules=("ip_vs", "kl_no_such_module")):
            pass


def test_missing_binary_says_how_to_install():
    with pytest.raises(UMLError, match="user-mode-linux"):
        UMLKernel(linux="kl-no-such-linux-binary").boot()


def test_not_booted_is_a_clear_error():
    with pytest.raises(UMLError, match="not booted"):
        UMLKernel().run(["true"])


def test_close_powers_off_and_is_idempotent():
    kernel = UMLKernel(modules=())
    kernel.boot()
    pid = kernel._proc.pid
    workdir = kernel.workdir
    kernel.close()
    kernel.close()
    assert not kernel.running
    assert kernel._proc.returncode is not None
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        import os

        os.killpg(pid, 0)


def test_call_pickles_arguments_and_results(uml):
    from kubelab.model import Endpoint

    ep = Endpoint("10.244.0.9", 8080, is_local=True)
    assert uml.call("ipaddress:ip_address", "10.0.0.1") == __import__("ipaddress").ip_address("10.0.0.1")
    uml.python("kl_box = []")
    uml.call("kl_box.append", ep)
    assert uml.python("str(kl_box[0])") == "10.244.0.9:8080"
    with pytest.raises(UMLRemoteError, match="ZeroDivisionError"):
        uml.call("operator:truediv", 1, 0)
