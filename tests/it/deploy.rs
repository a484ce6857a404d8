//! The deployment files against the code: the image's config and the Kubernetes package's
//! configs load with the daemon's own loader, the probes and ports of the Deployment are the
//! config's, the memory limit follows the sizing rule, the IAM policy has every action the
//! daemon calls, and the alerts and the dashboard query only series a running daemon exports.
//! (scripts/check-kube validates the manifests against the Kubernetes schemas;
//! `promtool test rules` runs the alerts' unit tests.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cruddur_syncd::config::{self, LoadedConfig};
use serde_json::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of a file, as JSON values.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Loads a packaged config as the daemon would, with `env` as its whole environment.
fn load(rel: &str, env: &[(&str, &str)]) -> Result<LoadedConfig, config::ConfigError> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    config::load_from_str(&repo(rel), &read(rel), env)
}

const PG_URL: &str = "postgres://cruddur:secret@db:5432/cruddur";
const POOL: (&str, &str) = ("CRUDDUR_SYNCD__AUTH__USER_POOL_ID", "us-east-1_AbCdEf123");
const CLIENT: (&str, &str) = ("CRUDDUR_SYNCD__AUTH__CLIENT_ID", "client123");

#[test]
fn the_image_config_works_with_environment_variables_alone() {
    let rel = "config/container.toml";
    let c = load(rel, &[POOL, CLIENT, ("CRUDDUR_SYNCD__POSTGRES__URL", PG_URL)]).unwrap();
    assert_eq!(c.config.postgres.connection_url(), PG_URL);
    assert_eq!(c.config.log.format, config::LogFormat::Json);
    assert_eq!(c.config.admin.listen.ip().to_string(), "0.0.0.0");
    assert_eq!(c.config.http.listen.ip().to_string(), "0.0.0.0");

    // url_file instead, as a mounted Secret would give it
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg-url");
    std::fs::write(&file, format!("{PG_URL}\n")).unwrap();
    let file = file.to_str().unwrap();
    let c = load(rel, &[POOL, CLIENT, ("CRUDDUR_SYNCD__POSTGRES__URL_FILE", file)]).unwrap();
    assert_eq!(c.config.postgres.connection_url(), PG_URL);

    // both, or neither: refused, naming the key
    let both = load(
        rel,
        &[POOL, CLIENT, ("CRUDDUR_SYNCD__POSTGRES__URL", PG_URL), ("CRUDDUR_SYNCD__POSTGRES__URL_FILE", file)],
    )
    .unwrap_err();
    assert!(both.problems().iter().any(|p| p.key == "postgres.url_file"), "{both}");
    let neither = load(rel, &[POOL, CLIENT]).unwrap_err();
    assert!(neither.problems().iter().any(|p| p.key == "postgres.url"), "{neither}");
    // the pool's ids have no usable default
    let no_pool = load(rel, &[("CRUDDUR_SYNCD__POSTGRES__URL", PG_URL)]).unwrap_err();
    let keys: BTreeSet<&str> = no_pool.problems().iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, BTreeSet::from(["auth.client_id", "auth.user_pool_id"]), "{no_pool}");
}

/// The resources a kustomization lists, every document of each.
fn kustomize_resources(dir: &str) -> Vec<Value> {
    let k = &yaml_docs(&format!("{dir}/kustomization.yaml"))[0];
    k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| yaml_docs(&format!("{dir}/{}", f.as_str().unwrap())))
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

fn port_named(container: &Value, name: &str) -> u16 {
    let ports = container["ports"].as_array().unwrap();
    let p = ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no port {name}: {container}"));
    p["containerPort"].as_u64().unwrap() as u16
}

#[test]
fn kustomize_base_wires_the_sidecar_to_its_config() {
    let base = "deploy/kustomize/base";
    let docs = kustomize_resources(base);
    let kustomization = &yaml_docs(&format!("{base}/kustomization.yaml"))[0];
    let deployment = of_kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];

    // The config the ConfigMap carries loads with the daemon's loader, given the Secret's env.
    let generator = &kustomization["configMapGenerator"][0];
    assert_eq!(generator["files"][0], "config.toml");
    let cfg_rel = format!("{base}/config.toml");
    let cfg = load(&cfg_rel, &[("CRUDDUR_SYNCD__POSTGRES__URL", PG_URL)]).unwrap().config;
    for overlay in std::fs::read_dir(repo("deploy/kustomize/overlays")).unwrap() {
        let rel = format!("deploy/kustomize/overlays/{}/config.toml", overlay.unwrap().file_name().to_string_lossy());
        if repo(&rel).exists() {
            load(&rel, &[("CRUDDUR_SYNCD__POSTGRES__URL", PG_URL)]).unwrap_or_else(|e| panic!("{rel}: {e}"));
        }
    }

    // A native sidecar: an init container that keeps running, beside the app.
    let sidecar = pod["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "cruddur-syncd").unwrap();
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert!(pod["containers"].as_array().unwrap().iter().any(|c| c["name"] == "app"));

    // Ports and probes are the config's.
    let admin = port_named(sidecar, "admin");
    assert_eq!(admin, cfg.admin.listen.port(), "the admin port is admin.listen's");
    assert_eq!(port_named(sidecar, "api"), cfg.http.listen.port(), "the api port is http.listen's");
    assert!(cfg.admin.listen.ip().is_unspecified(), "the kubelet reaches the pod IP, not loopback");
    for (probe, path) in [("startupProbe", "/readyz"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        let port = match &get["port"] {
            Value::String(name) => port_named(sidecar, name),
            Value::Number(n) => n.as_u64().unwrap() as u16,
            other => panic!("{probe} port {other}"),
        };
        assert_eq!(port, cfg.admin.listen.port(), "{probe} goes to admin.listen");
    }

    // The config file is where the args say, from the generated ConfigMap.
    let args: Vec<&str> = sidecar["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount = sidecar["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "config").unwrap();
    assert_eq!(format!("{}/config.toml", mount["mountPath"].as_str().unwrap()), config_path);
    assert!(mount.get("subPath").is_none(), "a subPath mount never sees ConfigMap updates");
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "config").unwrap();
    assert_eq!(volume["configMap"]["name"], generator["name"]);

    // The PostgreSQL URL from a Secret, nowhere else.
    let env = sidecar["env"].as_array().unwrap();
    let url = env.iter().find(|e| e["name"] == "CRUDDUR_SYNCD__POSTGRES__URL").unwrap();
    assert!(url["valueFrom"]["secretKeyRef"]["name"].is_string(), "{url}");
    assert!(cfg.postgres.url_file.is_none());

    // Sizing rule (docs/operations.md): limit >= 1.5 x cache.max_bytes + 96 MiB.
    let limit = mebibytes(sidecar["resources"]["limits"]["memory"].as_str().unwrap());
    let needed = 1.5 * cfg.cache.max_bytes as f64 / (1024.0 * 1024.0) + 96.0;
    assert!(limit >= needed, "memory limit {limit} MiB < {needed} MiB for cache.max_bytes");
    assert_eq!(sidecar["resources"]["requests"]["memory"], sidecar["resources"]["limits"]["memory"]);

    // Runs as the image's non-root user.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);

    // The service account carries the IRSA role; the PDB and the PodMonitor select this pod.
    let sa = of_kind(&docs, "ServiceAccount");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    let role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].as_str().unwrap();
    assert!(role.starts_with("arn:aws:iam::"), "{role}");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for kind in ["PodDisruptionBudget", "PodMonitor"] {
        let selector = &of_kind(&docs, kind)["spec"]["selector"]["matchLabels"];
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&labels[k], v, "{kind} selects {k}={v}");
        }
    }
    let endpoint = &of_kind(&docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(port_named(sidecar, endpoint["port"].as_str().unwrap()), cfg.admin.listen.port());
}

fn mebibytes(quantity: &str) -> f64 {
    let (n, unit) = quantity.split_at(quantity.find(|c: char| !c.is_ascii_digit()).unwrap_or(quantity.len()));
    let n: f64 = n.parse().unwrap();
    match unit {
        "Mi" => n,
        "Gi" => n * 1024.0,
        "M" => n * 1e6 / (1024.0 * 1024.0),
        "G" => n * 1e9 / (1024.0 * 1024.0),
        other => panic!("unit {other:?} of {quantity}"),
    }
}

#[test]
fn the_iam_policy_allows_what_the_daemon_calls() {
    let policy: Value = serde_json::from_str(&read("deploy/iam-policy.json")).unwrap();
    assert_eq!(policy["Version"], "2012-10-17");
    let mut actions = BTreeSet::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        match &statement["Action"] {
            Value::String(a) => {
                actions.insert(a.clone());
            }
            Value::Array(list) => actions.extend(list.iter().map(|a| a.as_str().unwrap().to_string())),
            other => panic!("Action {other}"),
        }
    }
    let needed = [
        // the cache's loads (table and index), the tailer's and `check`'s DescribeTable
        "dynamodb:DescribeTable",
        "dynamodb:Query",
        "dynamodb:GetItem",
        // the stream tailer
        "dynamodb:DescribeStream",
        "dynamodb:GetShardIterator",
        "dynamodb:GetRecords",
        "dynamodb:ListStreams",
        // the projector's row moves: a transaction of Put, Delete and ConditionCheck
        "dynamodb:TransactWriteItems",
        "dynamodb:PutItem",
        "dynamodb:DeleteItem",
        "dynamodb:ConditionCheckItem",
        // reconcile, and `check`'s Cognito probe
        "cognito-idp:ListUsers",
        "cognito-idp:DescribeUserPool",
    ];
    let missing: Vec<&str> = needed.iter().copied().filter(|a| !actions.contains(*a)).collect();
    assert!(missing.is_empty(), "missing from deploy/iam-policy.json: {missing:?}");
    let extra: Vec<&String> = actions.iter().filter(|a| !needed.contains(&a.as_str())).collect();
    assert!(extra.is_empty(), "more than the daemon needs: {extra:?}");
}

/// The metric names a PromQL expression uses: ours and the `process_*` series.
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &expr[i..];
        if starts_word && (rest.starts_with("cruddur_syncd_") || rest.starts_with("process_")) {
            let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            out.insert(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
}

fn dashboard_exprs(panels: &Value, out: &mut Vec<String>) {
    for p in panels.as_array().unwrap() {
        if let Some(inner) = p.get("panels") {
            dashboard_exprs(inner, out);
        }
        for t in p.get("targets").and_then(Value::as_array).into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
}

#[tokio::test]
async fn alerts_and_dashboard_query_only_series_the_daemon_exports() {
    let mut exprs = Vec::new();
    let rules = &yaml_docs("deploy/prometheus/alerts.yaml")[0];
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    let alert_count = exprs.len();
    assert!(alert_count >= 7, "{alert_count} alerts");
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/cruddur-syncd.json")).unwrap();
    dashboard_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() > alert_count + 10, "the dashboard's queries were not found");
    // The dashboard's variables are read from build_info too.
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let mut names = BTreeSet::new();
    for e in &exprs {
        metric_names(e, &mut names);
    }
    for family in
        ["cruddur_syncd_stream_iterator_age_seconds", "cruddur_syncd_auth_failures_total", "process_cpu_seconds_total"]
    {
        assert!(names.contains(family), "{family} is neither alerted on nor shown");
    }

    let app = crate::support::app::App::start().await;
    // The probes the Deployment points at answer on the admin listener.
    for path in ["/livez", "/readyz"] {
        assert_eq!(app.http.get(format!("{}{path}", app.admin)).send().await.unwrap().status(), 200, "{path}");
    }
    let text = app.metrics().await;
    let exported: BTreeSet<&str> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !exported.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "queried but not in /metrics: {missing:?}\n{text}");
    // The gate of the projector alert: 0 on an instance without the projector.
    assert_eq!(crate::support::metric(&text, "cruddur_syncd_projector_enabled", &[]), 0.0);
    app.stop().await;
}
