//! The daemon binary (`cruddur-syncd run`) as a child process, its stderr collected line by
//! line: for tests that signal, kill or restart the real process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The daemon binary running `run`, its stderr collected line by line.
pub struct Daemon {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// `http://127.0.0.1:PORT` of `http.listen` and `admin.listen` (the config asks for port 0).
    pub api: String,
    pub admin: String,
    pub http: reqwest::Client,
}

impl Daemon {
    pub async fn spawn(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = super::bin();
        cmd.arg("--config").arg(config).arg("run").stderr(Stdio::piped()).stdout(Stdio::null());
        cmd.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let mut d = Daemon { child, log, api: String::new(), admin: String::new(), http: reqwest::Client::new() };
        let serving = d.wait_log("the daemon serves", Duration::from_secs(30), |l| l.contains("api_addr=")).await;
        let field = |name: &str| -> String {
            let rest = &serving[serving.find(name).unwrap() + name.len()..];
            rest.split_whitespace().next().unwrap().to_string()
        };
        d.api = format!("http://{}", field("api_addr="));
        d.admin = format!("http://{}", field("admin_addr="));
        d
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, sig: &str) {
        assert!(std::process::Command::new("kill").args([sig, &self.pid()]).status().unwrap().success());
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    /// Waits for a stderr line matching `pred` and returns it; panics with the log otherwise.
    pub async fn wait_log(&mut self, what: &str, deadline: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + deadline;
        loop {
            if let Some(l) = self.log().into_iter().find(|l| pred(l)) {
                return l;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // let the reader thread drain what is left
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!("the daemon exited ({status}) before {what}:\n{}", self.log_text());
            }
            if Instant::now() > end {
                panic!("timed out after {deadline:?} waiting until {what}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.admin);
        super::wait_until(Duration::from_secs(30), "the daemon is ready", || async {
            self.http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }

    /// SIGKILL: no drain, no goodbye, like the OOM killer or a power cut. Returns once the
    /// process is gone.
    pub fn kill9(mut self) -> String {
        self.signal("-KILL");
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the daemon was not killed by SIGKILL: {status}"
        );
        self.log_text()
    }

    pub async fn reloads(&self, result: &str) -> f64 {
        super::metric(&self.metrics().await, "cruddur_syncd_config_reloads_total", &[&format!("result=\"{result}\"")])
    }

    pub async fn wait_reloads(&self, result: &str, n: f64) {
        let what = format!("config_reloads_total{{result=\"{result}\"}} reaches {n}");
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.reloads(result).await;
            if got == n {
                return;
            }
            assert!(got < n, "{what}: it is {got}\n{}", self.log_text());
            if Instant::now() > end {
                panic!("timed out waiting until {what} (it is {got}):\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a CORS preflight from `origin` is allowed by the API.
    pub async fn allows_origin(&self, origin: &str) -> bool {
        let res = self
            .http
            .request(reqwest::Method::OPTIONS, format!("{}/api/message_groups", self.api))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "authorization")
            .send()
            .await
            .unwrap();
        res.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()) == Some(origin)
    }

    /// SIGTERM, then the exit status (bounded: the daemon must stop by itself).
    pub async fn terminate(mut self) -> (Option<i32>, String) {
        self.signal("-TERM");
        let end = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("the daemon did not exit within 30s of SIGTERM:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status.code(), self.log_text())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
