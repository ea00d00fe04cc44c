//! The standard `process_*` metrics, read from /proc at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Collects CPU, memory, file descriptor and thread figures of this process.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// One scrape's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Figures {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    start_time_seconds: i64,
    threads: i64,
    open_fds: i64,
    max_fds: i64,
}

fn read() -> procfs::ProcResult<Figures> {
    let me = procfs::process::Process::myself()?;
    let stat = me.stat()?;
    let ticks = procfs::ticks_per_second() as f64;
    let boot = procfs::boot_time_secs()?;
    let max_fds = match me.limits()?.max_open_files.soft_limit {
        procfs::process::LimitValue::Value(n) => i64::try_from(n).unwrap_or(i64::MAX),
        procfs::process::LimitValue::Unlimited => -1,
    };
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Ok(Figures {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        resident_bytes: int(stat.rss * procfs::page_size()),
        virtual_bytes: int(stat.vsize),
        start_time_seconds: int(boot + stat.starttime / procfs::ticks_per_second()),
        threads: stat.num_threads,
        open_fds: i64::try_from(me.fd_count()?).unwrap_or(i64::MAX),
        max_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // Without /proc (not Linux, or hidden) there is nothing to report.
        let Ok(figures) = read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(figures.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                figures.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                figures.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                figures.start_time_seconds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                figures.threads,
            ),
            ("process_open_fds", "Number of open file descriptors.", figures.open_fds),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                figures.max_fds,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_this_process_are_plausible() {
        let figures = read().expect("/proc is readable in tests");
        assert!(figures.resident_bytes > 1 << 20, "{figures:?}");
        assert!(figures.virtual_bytes >= figures.resident_bytes, "{figures:?}");
        assert!(figures.threads >= 1 && figures.open_fds >= 3, "{figures:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let started = u64::try_from(figures.start_time_seconds).expect("positive");
        assert!(
            started <= now + 1 && started + 3600 > now,
            "started {started}, now {now}"
        );
    }
}
