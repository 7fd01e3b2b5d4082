//! The systemd service protocol (`Type=notify`): `READY=1` once every
//! listener is bound, `STOPPING=1` when shutdown begins, and `WATCHDOG=1`
//! pings at half the unit's `WatchdogSec=`. Does nothing when systemd did
//! not ask for it (no `NOTIFY_SOCKET` / `WATCHDOG_USEC` in the environment).

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells the service manager that popgate serves: call only after the
/// listeners are bound and `/readyz` would say 200, so `systemctl start`
/// returns when clients can connect. Starts the watchdog pings if the unit
/// has `WatchdogSec=`.
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
    if let Some(timeout) = sd_notify::watchdog_enabled() {
        // Pinged from a task of the runtime that runs every connection: if
        // the runtime stops scheduling, the pings stop and systemd restarts
        // popgate.
        let every = (timeout / 2).max(Duration::from_millis(100));
        tracing::info!(timeout_ms = timeout.as_millis() as u64, "systemd watchdog enabled");
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                    tracing::warn!(error = %e, "cannot ping the systemd watchdog");
                }
            }
        });
    }
}

/// Tells the service manager that shutdown has begun (the drain delay and
/// grace period follow).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}
