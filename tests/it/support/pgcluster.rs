//! A throwaway PostgreSQL cluster for tests that stop, crash or break PostgreSQL: never the
//! shared server on 5432, which other tests use at the same time (GUIDE section 3).
//!
//! `initdb` and `pg_ctl` from `/usr/lib/postgresql/15/bin` (override: `PG_BIN`), run as the
//! `postgres` OS user when the tests run as root (initdb refuses root), in a temporary
//! directory that user owns, on a free port, trust authentication, fsync off. About a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    running: bool,
}

fn is_root() -> bool {
    // `id -u` rather than libc: the test crate has no libc dependency.
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Runs `program args` as the `postgres` user when we are root, else as ourselves.
fn run(program: &Path, args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).output().unwrap_or_else(|e| panic!("running {} {args:?}: {e}", program.display()))
}

fn check(what: &str, out: Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgCluster {
    /// initdb + start; the cluster is removed on drop.
    pub fn start() -> PgCluster {
        let bin = PathBuf::from(std::env::var("PG_BIN").unwrap_or_else(|_| DEFAULT_BIN.to_string()));
        assert!(
            bin.join("initdb").exists(),
            "{} not found: install PostgreSQL 15 server binaries or set PG_BIN",
            bin.join("initdb").display()
        );
        // Created by the user who runs the server, so it owns the data and socket directories.
        let out = run(Path::new("mktemp"), &["-d", "/tmp/syncd-pgcluster-XXXXXX"]);
        check("mktemp", out.clone());
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let data = dir.join("data");
        check(
            "initdb",
            run(
                &bin.join("initdb"),
                &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
            ),
        );
        let mut cluster = PgCluster { dir, port: super::free_port(), bin, running: false };
        cluster.resume();
        cluster
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` on this cluster (`postgres` exists from the start).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the (stopped) server again on the same port with the same data.
    pub fn resume(&mut self) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        let out = run(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-o", &opts, "-w", "-t", "30", "start"],
        );
        if !out.status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.running = true;
    }

    /// Stops the server the hard way (`-m immediate`: like a crash; open transactions are lost,
    /// clients see their connections drop). Blocking; returns when the server is gone.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.dir.join("data");
        check(
            "pg_ctl stop",
            run(&self.bin.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]),
        );
        self.running = false;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let data = self.dir.join("data");
            let _ = run(&self.bin.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
