"""deploy/postgres: the CloudNativePG Cluster and Pooler deploy/README.md names, checked
against what the README promises of them (Kubernetes' schemas do not cover the
operator's kinds), and the pooler against the example overlay's connections."""

from __future__ import annotations

import yaml

from tests import deploy_helpers as shared
from tests.deploy_helpers import (
    DEPLOY,
    Obj,
    _config_map,
    _kustomize,
    _one,
)

# The shared fixtures (tests/deploy_helpers.py), rendered once for this module.
rendered_dir, rendered = shared.rendered_dir, shared.rendered


def test_the_ha_postgres_keeps_each_acknowledged_commit_on_two_nodes() -> None:
    """deploy/postgres: the CloudNativePG Cluster deploy/README.md names. Kubernetes'
    schemas do not cover the operator's kind, so this checks what the README promises of
    it: three instances on three nodes, one synchronous standby required for every commit,
    the roles and database the Secret's URLs name, and what pg_rewind needs."""
    docs = list(yaml.safe_load_all(_kustomize(DEPLOY / "postgres")))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [
        ("postgresql.cnpg.io/v1", "Cluster"),
        ("postgresql.cnpg.io/v1", "Pooler"),
    ]
    spec = docs[0]["spec"]
    assert spec["instances"] == 3
    assert spec["postgresql"]["synchronous"] == {"method": "any", "number": 1, "dataDurability": "required"}
    assert spec["postgresql"]["parameters"]["wal_log_hints"] == "on"
    assert spec["affinity"] == {
        "enablePodAntiAffinity": True,
        "topologyKey": "kubernetes.io/hostname",
        "podAntiAffinityType": "required",
    }
    assert (spec["bootstrap"]["initdb"]["database"], spec["bootstrap"]["initdb"]["owner"]) == (
        "invoices",
        "invoice_owner",
    )
    assert [(r["name"], r["login"]) for r in spec["managed"]["roles"]] == [("invoice_app", True)]
    # The README's Secret points both URLs at the Cluster's read-write Service, and asks
    # for the primary: a connection that lands on a demoted node is refused and retried.
    readme = (DEPLOY / "README.md").read_text()
    rw = f"{docs[0]['metadata']['name']}-rw"
    assert f"postgresql://invoice_app:…@{rw}:5432/invoices?target_session_attrs=read-write" in readme
    assert f"postgresql://invoice_owner:…@{rw}:5432/invoices?target_session_attrs=read-write" in readme


def test_the_pooler_is_the_transaction_mode_pgbouncer_the_example_expects(rendered: dict[str, list[Obj]]) -> None:
    """The example overlay's DATABASE_POOLER=pgbouncer needs a PgBouncer in transaction mode
    in front of the Cluster's primary; deploy/postgres ships it as CloudNativePG's Pooler,
    and deploy/README.md's Secret points DATABASE_URL at its Service (which has its name)."""
    cluster, pooler = yaml.safe_load_all(_kustomize(DEPLOY / "postgres"))
    spec = pooler["spec"]
    assert spec["cluster"] == {"name": cluster["metadata"]["name"]}
    assert (spec["type"], spec["pgbouncer"]["poolMode"]) == ("rw", "transaction")
    assert spec["instances"] >= 2
    assert pooler["metadata"]["name"] != cluster["metadata"]["name"]
    settings = _config_map(rendered["example"], "invoice-service-settings")["data"]
    assert settings["DATABASE_POOLER"] == "pgbouncer"
    # Every client connection the example can open fits PgBouncer's client limit.
    hpa = _one(rendered["example"], "HorizontalPodAutoscaler", "invoice-service")["spec"]
    clients = hpa["maxReplicas"] * 2 * int(settings["DB_POOL_MAX_SIZE"])
    assert clients <= int(spec["pgbouncer"]["parameters"]["max_client_conn"]) // spec["instances"] * 2
    readme = (DEPLOY / "README.md").read_text()
    assert f"DATABASE_URL='postgresql://invoice_app:…@{pooler['metadata']['name']}:5432/invoices'" in readme
