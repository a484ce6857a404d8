//! Telling systemd the truth (sd_notify): `READY=1` once the listeners are bound and the stream
//! tailer holds a position, `STATUS=` lines saying what the daemon is doing, `WATCHDOG=1` only
//! while the stream loop and the HTTP accept loop make progress, `RELOADING=1`/`READY=1` around
//! a reload and `STOPPING=1` at shutdown.
//!
//! Everything here is a no-op without `NOTIFY_SOCKET` (sd-notify checks it), so the daemon runs
//! the same under a terminal, a container runtime or systemd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::health::Probes;

/// How often `STATUS=` is refreshed without a watchdog (with one: at every ping).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Set once `READY=1` went out: a reload only reports READY again after that.
static READY_SENT: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any: sd-notify's
/// `watchdog_enabled`, which like libsystemd's `sd_watchdog_enabled` wants `WATCHDOG_PID` to
/// match only when it is set. A zero interval means no watchdog.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Waits until the tailer is positioned (or `stop`), then sends `READY=1` with a status, and
/// keeps the status and the watchdog going until `stop` is cancelled.
pub async fn supervise(probes: Probes, stop: CancellationToken) {
    send(&[NotifyState::Status("starting: positioning on the stream")]);
    let mut stream = probes.stream.clone();
    tokio::select! {
        _ = stop.cancelled() => return,
        r = stream.wait_for(|s| s.positioned) => if r.is_err() { return },
    }
    let status = probes.status_line();
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    READY_SENT.store(true, Ordering::Release);
    tracing::info!(status = %status, "ready");

    let watchdog = watchdog_timeout();
    let period = watchdog.map_or(STATUS_INTERVAL, |w| (w / 2).max(Duration::from_millis(10)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_stuck = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = probes.status_line();
        match watchdog.map(|w| (w, probes.stuck(w))) {
            None => send(&[NotifyState::Status(&status)]),
            Some((_, None)) => {
                if was_stuck {
                    tracing::info!("the daemon's loops make progress again; watchdog pings resumed");
                    was_stuck = false;
                }
                send(&[NotifyState::Status(&status), NotifyState::Watchdog]);
            }
            Some((_, Some(why))) => {
                // No WATCHDOG=1: systemd restarts the service when its WatchdogSec runs out.
                if !was_stuck {
                    tracing::error!("{why}; withholding watchdog pings so that systemd restarts the daemon");
                    was_stuck = true;
                }
                let status = format!("stuck: {why}");
                send(&[NotifyState::Status(&status)]);
            }
        }
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC` that systemd ≥ 253 wants for `Type=notify-reload`.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading the config")]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading the config")]),
    }
}

/// `READY=1` after a reload (only once the daemon was ready in the first place).
pub fn reloaded(status: &str) {
    if READY_SENT.load(Ordering::Acquire) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    } else {
        send(&[NotifyState::Status(status)]);
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: draining requests")]);
}
