"""Reaching the API server: kubeconfig contexts, TLS, bearer tokens, client certificates,
exec credential plugins, --in-cluster, and clear errors for configurations that cannot work.

Addresses: the test API server listens on 127.0.0.1 (HTTPS, ephemeral port),
with a throwaway CA made per test module; objects carry 10.96.0.0/16 IPs.
"""

from __future__ import annotations

import asyncio
import stat
import sys

import pytest
from fakeapi import FakeAPIServer, make_pki
from fakeapi.testing import FAST, Recorder, running, service, write_kubeconfig

from kubelab.proxy.sources import kube

pytestmark = pytest.mark.timeout(120)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _source(cfg: kube.KubeSourceConfig, environ=None) -> tuple[kube.KubeSource, Recorder]:
    rec = Recorder()
    return kube.KubeSource(cfg, [rec], deps=kube.KubeSourceDeps(environ=environ)), rec


async def _synced_services(api: FakeAPIServer, src: kube.KubeSource, rec: Recorder) -> list[str]:
    async with running(src):
        await api.wait_for(lambda: src.synced, what="synced")
    return sorted(rec.names("on_service_add"))


def _exec_plugin(tmp_path, token: str, expires: str | None = None):
    """An exec credential plugin (client.authentication.k8s.io/v1) that counts its runs."""
    status = {"token": token, **({"expirationTimestamp": expires} if expires else {})}
    script = tmp_path / "plugin.py"
    runs = tmp_path / "runs"
    script.write_text(
        "import json, pathlib, sys\n"
        f"p = pathlib.Path({str(runs)!r}); p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else '1')\n"
        "json.dump({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential', "
        f"'status': {status!r}}}, sys.stdout)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": [str(script)], "interactiveMode": "Never"}}
    return user, runs


CREDENTIALS = ["token", "token-file", "client-cert", "exec-plugin"]


@pytest.mark.parametrize("how", CREDENTIALS)
def test_kubeconfig_credentials_over_tls(tmp_path, pki, how):
    async def main():
        tokens = {"s3cret": "alice"} if how != "client-cert" else None
        ctx = pki.server_context(require_client_cert=how == "client-cert")
        async with FakeAPIServer(ssl_context=ctx, tokens=tokens) as api:
            api.apply(service("web", "10.96.0.5"))
            runs = None
            if how == "token":
                user = {"token": "s3cret"}
            elif how == "token-file":
                (tmp_path / "tok").write_text("s3cret")
                user = {"tokenFile": str(tmp_path / "tok")}
            elif how == "client-cert":
                user = {"client-certificate": str(pki.client_cert), "client-key": str(pki.client_key)}
            else:
                user, runs = _exec_plugin(tmp_path, "s3cret")
            kc = write_kubeconfig(tmp_path / "kc", api.url, user=user, ca=str(pki.ca_cert))
            src, rec = _source(kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), **FAST))
            assert await _synced_services(api, src, rec) == ["web"]
            users = {r.user for r in api.requests if r.status == 200}
            assert users == ({"kubelab-test"} if how == "client-cert" else {"alice"})
            assert all(r.status != 401 for r in api.requests)
            if runs is not None:
                assert runs.read_text() == "1"  # run once; a token without expiry is reused

    run(main())


def test_exec_plugin_rerun_after_401(tmp_path, pki):
    """A token the server stops accepting makes the source run the plugin again."""

    async def main():
        tokens = {"first": "alice"}
        async with FakeAPIServer(ssl_context=pki.server_context(), tokens=tokens) as api:
            api.apply(service("web", "10.96.0.6"))
            user, runs = _exec_plugin(tmp_path, "first")
            kc = write_kubeconfig(tmp_path / "kc", api.url, user=user, ca=str(pki.ca_cert))
            src, rec = _source(kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), endpoint_slices=False, **FAST))
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                # Rotate: the old token is revoked, the plugin now prints the new one.
                tokens.clear()
                tokens["second"] = "alice"
                user2, _ = _exec_plugin(tmp_path, "second")
                api.cut_watches()
                await api.wait_for(lambda: any(r.status == 401 for r in api.requests), what="a 401")
                api.apply(service("after", "10.96.0.7"))
                await api.wait_for(lambda: "after" in rec.names("on_service_add"), what="recovered with new token")
            assert int(runs.read_text()) >= 2

    run(main())


def test_context_selection(tmp_path, pki):
    async def main():
        async with FakeAPIServer(ssl_context=pki.server_context(), tokens={"a": "a"}) as one, \
                   FakeAPIServer(ssl_context=pki.server_context(), tokens={"b": "b"}) as two:
            one.apply(service("from-one", "10.96.1.1"))
            two.apply(service("from-two", "10.96.1.2"))
            kc = write_kubeconfig(tmp_path / "kc", one.url, user={"token": "a"}, ca=str(pki.ca_cert),
                                  extra_contexts=[("other", two.url, {"token": "b"})])
            src, rec = _source(kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), **FAST))
            assert await _synced_services(one, src, rec) == ["from-one"]
            src, rec = _source(kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), context="other", **FAST))
            assert await _synced_services(two, src, rec) == ["from-two"]
            # --master overrides the kubeconfig's server (kube-proxy's flag).
            src, rec = _source(kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), context="other",
                                                               master=one.url, **FAST))
            one.tokens["b"] = "b"
            assert await _synced_services(one, src, rec) == ["from-one"]

    run(main())


def test_in_cluster(tmp_path, pki):
    async def main():
        async with FakeAPIServer(ssl_context=pki.server_context(), tokens={"sa-token": "system:serviceaccount:kube-system:kubelab-proxy"}) as api:
            api.apply(service("web", "10.96.2.1"))
            sa = tmp_path / "serviceaccount"
            sa.mkdir()
            (sa / "token").write_text("sa-token")
            (sa / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
            env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
            cfg = kube.KubeSourceConfig.for_proxy(in_cluster=True, service_account_dir=str(sa), **FAST)
            src, rec = _source(cfg, environ=env)
            assert await _synced_services(api, src, rec) == ["web"]
            assert {r.user for r in api.requests} == {"system:serviceaccount:kube-system:kubelab-proxy"}

    run(main())


ROTATIONS = ["in-cluster", "kubeconfig-token-file"]


@pytest.mark.parametrize("how", ROTATIONS)
def test_rotated_token_file_is_read_again_after_401(tmp_path, pki, how):
    """The kubelet rewrites the projected service-account token in place; after a 401 the source reads it again."""

    async def main():
        user = "system:serviceaccount:kube-system:kubelab-proxy"
        tokens = {"old-token": user}
        async with FakeAPIServer(ssl_context=pki.server_context(), tokens=tokens) as api:
            api.apply(service("web", "10.96.2.5"))
            sa = tmp_path / "serviceaccount"
            sa.mkdir()
            (sa / "token").write_text("old-token\n")
            (sa / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
            env = None
            if how == "in-cluster":
                env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
                cfg = kube.KubeSourceConfig.for_proxy(in_cluster=True, service_account_dir=str(sa),
                                                      endpoint_slices=False, **FAST)
            else:
                # kubeadm's kube-proxy kubeconfig: tokenFile (relative paths are from the kubeconfig's folder).
                kc = write_kubeconfig(tmp_path / "kc", api.url, user={"tokenFile": "serviceaccount/token"},
                                      ca=str(sa / "ca.crt"))
                cfg = kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), endpoint_slices=False, **FAST)
            src, rec = _source(cfg, environ=env)
            async with running(src):
                await api.wait_for(lambda: src.synced, what="synced")
                # Rotation: the old token is revoked, the file holds the new one.
                tokens.clear()
                tokens["new-token"] = user
                (sa / "token").write_text("new-token\n")
                api.cut_watches()
                await api.wait_for(lambda: any(r.status == 401 for r in api.requests), what="a 401")
                api.apply(service("after", "10.96.2.6"))
                await api.wait_for(lambda: "after" in rec.names("on_service_add"), what="recovered with the new token")
            assert src.reflectors["services"].lists == 1  # resumed the watch, no relist needed

    run(main())


def test_token_file_is_read_again_every_minute(tmp_path, pki):
    """A kubeconfig tokenFile rewritten in place is picked up a minute later, before any 401 (client-go's cadence)."""

    async def main():
        now = [1000.0]
        async with FakeAPIServer(ssl_context=pki.server_context(), tokens={"t1": "first", "t2": "second"}) as api:
            api.apply(service("web", "10.96.2.7"))
            (tmp_path / "token").write_text("t1")
            kc = write_kubeconfig(tmp_path / "kc", api.url, user={"tokenFile": str(tmp_path / "token")},
                                  ca=str(pki.ca_cert))
            cfg = kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), endpoint_slices=False, **FAST)
            src = kube.KubeSource(cfg, [Recorder()], deps=kube.KubeSourceDeps(clock=lambda: now[0]))
            async with running(src):
                await api.wait_for(lambda: src.synced and api.watching("services") == 1, what="synced and watching")
                (tmp_path / "token").write_text("t2")
                api.cut_watches()  # under a minute: the token in hand is still used
                await api.wait_for(lambda: len(api.requests_for(op="watch")) >= 2 and api.watching("services") == 1,
                                   what="a second watch")
                now[0] += kube.TOKEN_FILE_REREAD
                api.cut_watches()
                await api.wait_for(lambda: api.requests_for(op="watch")[-1].user == "second", what="the new token")
            assert [r.user for r in api.requests_for(op="watch")][:2] == ["first", "first"]
            assert all(r.status != 401 for r in api.requests)

    run(main())


BAD_CONFIGS = [
    ("no-source", {}, "give --kubeconfig FILE, --in-cluster"),
    ("both", {"kubeconfig": "x", "in_cluster": True}, "not both"),
    ("missing-file", {"kubeconfig": "/nonexistent/kubeconfig"}, "/nonexistent/kubeconfig: no such file"),
    ("unknown-context", {"kubeconfig": "KC", "context": "nope"}, "nope"),
    ("not-yaml-config", {"kubeconfig": "GARBAGE"}, "--kubeconfig"),
    ("in-cluster-outside-a-pod", {"in_cluster": True, "service_account_dir": "/nonexistent"}, "--in-cluster"),
]


@pytest.mark.parametrize("kw,needle", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_is_a_clear_error(tmp_path, kw, needle):
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:1")
    garbage = tmp_path / "garbage"
    garbage.write_text("this: [is not a kubeconfig")
    kw = {k: (str(kc) if v == "KC" else str(garbage) if v == "GARBAGE" else v) for k, v in kw.items()}
    src, _ = _source(kube.KubeSourceConfig.for_proxy(**kw), environ={})
    with pytest.raises(kube.KubeConfigError) as err:
        asyncio.run(src.connect())
    assert needle in str(err.value)


def test_unreachable_server_is_retried_not_fatal(tmp_path):
    """Connection refused is an outage, not a configuration error: the source keeps trying."""

    async def main():
        slept = []

        async def fake_sleep(d):
            slept.append(d)
            await asyncio.sleep(0.001)

        kc = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")  # discard port: refused
        cfg = kube.KubeSourceConfig.for_proxy(kubeconfig=str(kc), endpoint_slices=False, **FAST)
        src = kube.KubeSource(cfg, [Recorder()], deps=kube.KubeSourceDeps(sleep=fake_sleep))
        task = asyncio.ensure_future(src.run())
        while len(slept) < 5:
            await asyncio.sleep(0.01)
            assert not task.done(), task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not src.synced

    run(main())


def test_kubesource_compat_constructors(tmp_path):
    """The call shapes other rooms use build the right configs."""
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:1")
    src = kube.KubeSource(kubeconfig=str(kc), handlers=[Recorder()], node_name="n1")
    assert src.config.purpose == "proxy" and src.config.node_name == "n1"
    assert src.config.service_selectors == ("!service.kubernetes.io/service-proxy-name", "spec.clusterIP!=None")
    assert src.config.endpoints_label_selector == "!service.kubernetes.io/headless"
    dns = kube.KubeSourceConfig.for_dns(kubeconfig=str(kc))
    assert dns.pods and dns.service_selectors == ("", "") and dns.endpoints_label_selector == ""
    import argparse

    p = argparse.ArgumentParser()
    kube.add_arguments(p)
    args = p.parse_args(["--kubeconfig", str(kc), "--context", "x"])
    cfg = kube.config_from_args(args, purpose="dns")
    assert (cfg.kubeconfig, cfg.context, cfg.purpose) == (str(kc), "x", "dns")
    assert kube.config_from_args(p.parse_args([])) is None
