//! What an operator sees of a running daemon besides the API: `--version`, the access log and
//! its request ids, HEAD, and the process and build series of /metrics.

use std::time::Duration;

use crate::support;
use crate::support::app::{App, Setup};
use crate::support::daemon::Daemon;

#[test]
fn version_names_the_revision() {
    let out = support::bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let expected =
        format!("cruddur-syncd {} (revision {})\n", env!("CARGO_PKG_VERSION"), cruddur_syncd::version::REVISION);
    assert_eq!(text, expected);
    // Built from this git checkout, the revision is a commit, not the fallback.
    if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.git")).exists()
        && std::env::var_os("CRUDDUR_SYNCD_REVISION").is_none()
    {
        let rev = cruddur_syncd::version::REVISION;
        assert!(rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit()), "{rev}");
    }
}

#[tokio::test]
async fn head_request_ids_and_process_series() {
    let app = App::start().await;
    let a = app.user("alice", None, true).await;
    let get = app.get("/api/message_groups", &a.access_token).await;
    assert_eq!(get.status(), 200);
    let etag = get.headers()["etag"].clone();
    let generated = get.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(generated.len() == 16 && generated.bytes().all(|b| b.is_ascii_hexdigit()), "{generated}");

    // HEAD: the GET's headers, no body.
    let head =
        app.http.head(format!("{}/api/message_groups", app.api)).bearer_auth(&a.access_token).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["etag"], etag);
    assert_eq!(head.headers()["cache-control"], "private, no-cache");
    assert!(head.bytes().await.unwrap().is_empty());

    // A sane id from a proxy in front is kept; anything else is replaced.
    for (sent, kept) in [("edge-7f3a:1", true), ("has space", false), (&*"x".repeat(65), false)] {
        let res =
            app.http.get(format!("{}/api/message_groups", app.api)).header("x-request-id", sent).send().await.unwrap();
        assert_eq!(res.status(), 401);
        let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id == sent, kept, "{sent:?} -> {id:?}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["request_id"], id.as_str());
    }

    let m = app.metrics().await;
    for series in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        let value = m.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series} missing:\n{m}"));
        let v: f64 = value.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v > 0.0, "{value}");
    }
    let build = format!("cruddur_syncd_build_info{{version=\"{}\",revision=\"", env!("CARGO_PKG_VERSION"));
    assert!(m.contains(&build), "{m}");
    app.stop().await;
}

#[tokio::test]
async fn access_log_one_line_per_request_with_its_id() {
    let app = App::start_with(Setup {
        external_daemon: true,
        extra_config: "[log]\naccess = true\nlevel = \"info\"\n".into(),
        ..Setup::default()
    })
    .await;
    let a = app.user("alice", None, true).await;
    let mut daemon = Daemon::spawn(&app.config_path, &[]).await;
    daemon.wait_ready().await;
    let res = daemon
        .http
        .get(format!("{}/api/message_groups", daemon.api))
        .header("x-request-id", "access-test-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = daemon
        .http
        .get(format!("{}/api/message_groups?limit=5", daemon.api))
        .bearer_auth(&a.access_token)
        .header("x-request-id", "access-test-2")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let refused = daemon
        .wait_log("the refused request is logged", Duration::from_secs(10), |l| l.contains("access-test-1"))
        .await;
    for field in ["method=GET", "path=/api/message_groups", "status=401", "auth_failure=\"missing\"", "duration_ms="] {
        assert!(refused.contains(field), "{field} missing from {refused}");
    }
    let served =
        daemon.wait_log("the served request is logged", Duration::from_secs(10), |l| l.contains("access-test-2")).await;
    assert!(served.contains("status=200") && served.contains("route=\"/api/message_groups\""), "{served}");
    assert!(!served.contains("auth_failure"), "{served}");
    // The token is never logged.
    assert!(!daemon.log_text().contains(&a.access_token));
    daemon.signal("-TERM");
    let _ = daemon.child.wait();
}

#[test]
fn completions_and_man_page_need_no_config() {
    let run = |args: &[&str]| {
        let out =
            support::bin().args(args).env("CRUDDUR_SYNCD_CONFIG", "/nonexistent/cruddur-syncd.toml").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("cruddur-syncd") && bash.contains("list-conversations"), "{bash}");
    assert!(
        bash.lines().any(|l| l.trim_start().starts_with("complete -F ") && l.ends_with(" cruddur-syncd")),
        "{bash}"
    );
    let zsh = run(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef cruddur-syncd"), "{zsh}");
    let man = run(&["man"]);
    assert!(man.contains(".TH cruddur-syncd"), "{man}");
    assert!(man.contains("reconcile") && man.contains("completions"), "{man}");
    // An unknown shell is a usage error (2), as every bad argument.
    let out = support::bin().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
