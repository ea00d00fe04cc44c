//! Waiting in tests: for a condition with a deadline, never for a fixed time.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(20);

/// Why every wait must fail now (a control-plane process died), if it must.
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Logs whose tails every failed wait shows: the e2e harness registers its
/// processes' logs (control plane, containerd, kubelet) here.
static LOGS: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// How many lines of each registered log a failed wait shows.
const TAIL_LINES: usize = 12;

/// Shows the tail of the log at `path`, under `name`, with every wait that
/// times out from now on, until [`forget_logs`].
pub fn show_log_on_failure(name: &str, path: &Path) {
    if let Ok(mut logs) = LOGS.lock() {
        logs.retain(|(known, _)| known != name);
        logs.push((name.to_string(), path.to_path_buf()));
    }
}

/// Stops showing the logs [`show_log_on_failure`] registered (the harness
/// that registered them stopped).
pub fn forget_logs() {
    if let Ok(mut logs) = LOGS.lock() {
        logs.clear();
    }
}

/// `message`, followed by the tails of the registered logs.
pub(crate) fn with_logs(message: String) -> String {
    let logs = LOGS.lock().map(|logs| logs.clone()).unwrap_or_default();
    logs.into_iter().fold(message, |mut text, (name, path)| {
        let tail = crate::process::log_tail(&path, TAIL_LINES);
        if !tail.is_empty() {
            text.push_str(&format!(
                "\n--- last lines of {name}'s log ({}):\n{tail}",
                path.display()
            ));
        }
        text
    })
}

/// Fails the test: `what` timed out after `limit` (with the registered logs).
fn timed_out(limit: Duration, what: &str) -> ! {
    panic!(
        "{}",
        with_logs(format!("timed out after {limit:?} waiting for: {what}"))
    )
}

/// Makes every wait in this test binary fail at once with `message`, until
/// [`clear_failure`]: the e2e harness calls it when a process it depends on exits.
pub fn fail_waits(message: String) {
    if let Ok(mut failure) = FAILURE.lock() {
        failure.get_or_insert(message);
    }
}

/// Ends what [`fail_waits`] started.
pub fn clear_failure() {
    if let Ok(mut failure) = FAILURE.lock() {
        *failure = None;
    }
}

fn check_failure() {
    let failure = FAILURE.lock().ok().and_then(|f| f.clone());
    if let Some(message) = failure {
        panic!("{message}");
    }
}

/// Fails the test instead of hanging it when `future` does not finish within `limit`.
pub async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    let watched = async {
        tokio::pin!(future);
        loop {
            tokio::select! {
                value = &mut future => return value,
                () = tokio::time::sleep(POLL) => check_failure(),
            }
        }
    };
    match tokio::time::timeout(limit, watched).await {
        Ok(value) => value,
        Err(_) => panic!("{}", with_logs(format!("did not finish within {limit:?}"))),
    }
}

/// Polls `condition` until it holds; fails the test naming `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        check_failure();
        if tokio::time::Instant::now() >= deadline {
            timed_out(limit, what);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`eventually`], polling every 5 ms, and returns how long the
/// condition took to hold: for benchmarks that measure it.
pub async fn timed(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = tokio::time::Instant::now();
    while !condition() {
        check_failure();
        if started.elapsed() >= limit {
            timed_out(limit, what);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// Polls the async `check` until it yields a value; fails the test naming `what` after `limit`.
pub async fn eventually_some<T, F, Fut>(limit: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll(limit, POLL, check, check_failure).await {
        Some((value, _)) => value,
        None => timed_out(limit, what),
    }
}

/// Polls the async `check` every 50 ms until it yields a value, and how
/// long that took; the error names `what` after `limit`. For waits outside
/// tests (the demo), where a timeout is an error to report, not a panic.
pub async fn until<T, F, Fut>(limit: Duration, what: &str, check: F) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(limit, Duration::from_millis(50), check, || {})
        .await
        .ok_or_else(|| anyhow::anyhow!("gave up after {limit:?} waiting until {what}"))
}

/// Polls `check` every `every` until it yields a value (then with the time
/// it took) or `limit` passed (`None`), calling `tick` between polls.
async fn poll<T, F, Fut>(
    limit: Duration,
    every: Duration,
    mut check: F,
    mut tick: impl FnMut(),
) -> Option<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some((value, started.elapsed()));
        }
        tick();
        if started.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}
