//! `kubectl volplane`: capacity per node and class, why a pod's volumes
//! fit a node or not, and the volumes volplane holds unhealthy. The
//! answers come from [`model`] (pure); this module reads the objects and
//! prints tables the way `kubectl get` does (or JSON / YAML).

pub mod complete;
pub mod model;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Serialize;
use volplane_capacity::quantity::format_bytes;
use volplane_health::model::{ABNORMAL_ANNOTATION, NODE_FAILED_ANNOTATION, REASON_ABNORMAL, REASON_NODE_FAILED};

use model::{CapacityRow, Cluster, Tracking, Why};

const EXAMPLES: &str = "Examples:
  # Capacity of every node and storage class
  kubectl volplane capacity

  # Only class fast, with the objects' names and ages
  kubectl volplane capacity --class fast -o wide

  # Why is pod web-0 Pending? Each claim on each node, and a verdict
  kubectl volplane why web-0 -n shop

  # Volumes volplane holds abnormal or on a failed node, everywhere
  kubectl volplane health -A";

/// `kubectl volplane`.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-volplane",
    bin_name = "kubectl volplane",
    version,
    about = "Storage capacity per node and class, why a pod's volumes fit or not, and volume health",
    after_help = EXAMPLES
)]
pub struct PluginArgs {
    /// Path to the kubeconfig file (default: KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (default: the context's).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Every namespace (`health`).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Output>,
    /// What to show.
    #[command(subcommand)]
    pub command: Command,
}

/// `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// More columns.
    Wide,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One row per node and storage class: the capacity the scheduler sees.
    Capacity {
        /// Only this StorageClass.
        #[arg(long, value_name = "CLASS")]
        class: Option<String>,
        /// Only classes of this CSI driver.
        #[arg(long, value_name = "DRIVER")]
        driver: Option<String>,
    },
    /// For each claim of POD and each node: fits, or exactly why not.
    Why {
        /// The pod.
        pod: String,
    },
    /// The PVCs whose volumes volplane holds abnormal or on a failed node.
    Health,
}

/// Runs the plugin; failures are one `error:` line and exit code 1.
pub async fn main() -> ExitCode {
    let args = match PluginArgs::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(&args).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", crate::error_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// What the plugin prints for `args`.
pub async fn run(args: &PluginArgs) -> anyhow::Result<String> {
    answer(&connect(args).await?, args).await
}

/// What the plugin prints for `args`, asking `client` (the connection
/// flags of `args` are not read).
pub async fn answer(client: &kube::Client, args: &PluginArgs) -> anyhow::Result<String> {
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let color = std::io::stdout().is_terminal();
    match &args.command {
        Command::Capacity { class, driver } => {
            let cluster = read_cluster(client).await?;
            let now = k8s_openapi::jiff::Timestamp::now();
            let rows = model::capacity_rows(&cluster, class.as_deref(), driver.as_deref(), now);
            render(args.output, &rows, || {
                capacity_table(&rows, args.output == Some(Output::Wide))
            })
        }
        Command::Why { pod } => {
            let why = why(client, &namespace, pod).await?;
            render(args.output, &why, || why_text(&why, color))
        }
        Command::Health => {
            let rows = health_rows(client, (!args.all_namespaces).then_some(namespace.as_str())).await?;
            render(args.output, &rows, || health_table(&rows, args.all_namespaces))
        }
    }
}

/// Whether and where the volumes of pod `namespace/name` fit, read from the cluster.
pub async fn why(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<Why> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .get(name)
        .await
        .with_context(|| format!("cannot read pod {namespace}/{name}"))?;
    let pvcs = list(Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)).await?;
    let pvs = list(Api::<PersistentVolume>::all(client.clone())).await?;
    let cluster = read_cluster(client).await?;
    Ok(model::why(&pod, &pvcs, &pvs, &cluster))
}

async fn connect(args: &PluginArgs) -> anyhow::Result<kube::Client> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None => kube::Config::from_kubeconfig(&options)
            .await
            .context("no usable kubeconfig (KUBECONFIG or ~/.kube/config)")?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn list<K>(api: Api<K>) -> anyhow::Result<Vec<K>>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    let listed = api
        .list(&ListParams::default())
        .await
        .with_context(|| format!("cannot list {kind} objects"))?;
    Ok(listed.items)
}

async fn read_cluster(client: &kube::Client) -> anyhow::Result<Cluster> {
    Ok(Cluster {
        nodes: list(Api::<Node>::all(client.clone())).await?,
        classes: list(Api::<StorageClass>::all(client.clone())).await?,
        drivers: list(Api::<CSIDriver>::all(client.clone())).await?,
        capacities: list(Api::<CSIStorageCapacity>::all(client.clone())).await?,
    })
}

fn render<T: Serialize>(output: Option<Output>, value: &T, text: impl FnOnce() -> String) -> anyhow::Result<String> {
    Ok(match output {
        Some(Output::Json) => serde_json::to_string_pretty(value)? + "\n",
        Some(Output::Yaml) => serde_saphyr::to_string(value).map_err(|e| anyhow::anyhow!("cannot write YAML: {e}"))?,
        Some(Output::Wide) | None => text(),
    })
}

/// Columns padded like `kubectl get`: three spaces between them.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(width - cell.chars().count() + 3));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn quantity(bytes: Option<i64>) -> String {
    bytes.map_or_else(|| "-".to_string(), format_bytes)
}

fn capacity_table(rows: &[CapacityRow], wide: bool) -> String {
    let mut headers = vec![
        "NODE",
        "CLASS",
        "DRIVER",
        "CAPACITY",
        "RESERVED",
        "FROM DRIVER",
        "MAX VOLUME SIZE",
        "OBJECT",
        "MANAGED-BY",
        "AGE",
    ];
    if wide {
        headers.push("TOPOLOGY");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let capacity = match row.tracking {
                Tracking::Tracked => quantity(row.capacity),
                Tracking::NotTracked => "not tracked".to_string(),
            };
            let age = row.age_seconds.map(|s| model::human_age(Duration::from_secs(s)));
            let mut cells = vec![
                row.node.clone(),
                row.class.clone(),
                row.driver.clone(),
                capacity,
                quantity(row.reserved),
                quantity(row.driver_capacity),
                quantity(row.maximum_volume_size),
                row.object.clone().unwrap_or_else(|| "-".into()),
                managed_by_text(row),
                age.unwrap_or_else(|| "-".into()),
            ];
            if wide {
                cells.push(row.topology.clone().unwrap_or_else(|| "-".into()));
            }
            cells
        })
        .collect();
    table(&headers, &cells)
}

/// Who maintains the object shown, and how many stale ones also apply.
fn managed_by_text(row: &CapacityRow) -> String {
    let Some(manager) = row.managed_by else {
        return "-".into();
    };
    match row.others {
        0 => manager.text().to_string(),
        others => format!("{}+{others}-stale", manager.text()),
    }
}

fn why_text(why: &Why, color: bool) -> String {
    let mut out = String::new();
    out.push_str(&format!("Pod {}\n", why.pod));
    for claim in &why.claims {
        let source = if claim.from_template {
            "from the ephemeral volume template; the PVC does not exist yet".to_string()
        } else if claim.missing {
            "missing".to_string()
        } else if let Some(pv) = &claim.bound_to {
            format!("PVC bound to {pv}")
        } else {
            "PVC, not bound yet".to_string()
        };
        out.push_str(&format!(
            "  claim {} (volume {}, class {}, {}): {source}\n",
            claim.name,
            claim.volume,
            claim.class.as_deref().unwrap_or("-"),
            claim.size.map_or_else(|| "no size".to_string(), format_bytes),
        ));
    }
    out.push('\n');
    let mut rows = Vec::new();
    for (node, fits) in &why.nodes {
        for (claim, fit) in why.claims.iter().zip(fits) {
            let verdict = if fit.fits { "fits" } else { "no" };
            rows.push(vec![
                node.clone(),
                claim.name.clone(),
                verdict.to_string(),
                fit.reason.clone(),
            ]);
        }
    }
    out.push_str(&table(&["NODE", "CLAIM", "FITS", "WHY"], &rows));
    out.push('\n');
    let fits_somewhere = why.nodes.iter().any(|(_, f)| f.iter().all(|f| f.fits));
    let (start, end) = match (color, fits_somewhere) {
        (false, _) => ("", ""),
        (true, true) => ("\x1b[32m", "\x1b[0m"),
        (true, false) => ("\x1b[31m", "\x1b[0m"),
    };
    out.push_str(&format!("{start}{}{end}\n", why.verdict));
    if let Some(held) = &why.held {
        out.push_str(&format!("Finished: {held}\n"));
    }
    out
}

/// One row of `kubectl volplane health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthRow {
    /// The PVC's namespace.
    pub namespace: String,
    /// The PVC.
    pub claim: String,
    /// Its PV.
    pub volume: String,
    /// The driver's message, or the failed node.
    pub condition: String,
    /// When volplane said so (its last event), if the event is still kept.
    pub since: Option<String>,
    /// Pods using the claim.
    pub pods: Vec<String>,
}

/// The PVs volplane annotated as abnormal or on a failed node, as rows:
/// pure, from the PVs, the pods and volplane's events.
pub fn health_rows_of(
    pvs: &[PersistentVolume],
    pods: &[Pod],
    events: &[Event],
    namespace: Option<&str>,
) -> Vec<HealthRow> {
    let mut rows = Vec::new();
    for pv in pvs {
        let annotations = pv.metadata.annotations.clone().unwrap_or_default();
        let Some(claim) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
            continue;
        };
        let (Some(ns), Some(name)) = (claim.namespace.clone(), claim.name.clone()) else {
            continue;
        };
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        let conditions = [
            (annotations.get(ABNORMAL_ANNOTATION).cloned(), REASON_ABNORMAL),
            (
                annotations
                    .get(NODE_FAILED_ANNOTATION)
                    .filter(|n| !n.is_empty())
                    .map(|node| format!("node {node} failed")),
                REASON_NODE_FAILED,
            ),
        ];
        for (condition, reason) in conditions {
            let Some(condition) = condition else {
                continue;
            };
            rows.push(HealthRow {
                since: last_event(events, &ns, &name, reason),
                pods: pods_using(pods, &ns, &name),
                namespace: ns.clone(),
                claim: name.clone(),
                volume: pv.metadata.name.clone().unwrap_or_default(),
                condition,
            });
        }
    }
    rows.sort_by(|a, b| (&a.namespace, &a.claim).cmp(&(&b.namespace, &b.claim)));
    rows
}

fn last_event(events: &[Event], namespace: &str, claim: &str, reason: &str) -> Option<String> {
    events
        .iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.involved_object.namespace.as_deref() == Some(namespace)
                && e.involved_object.name.as_deref() == Some(claim)
        })
        .filter_map(|e| {
            e.event_time
                .as_ref()
                .map(|t| t.0)
                .or(e.last_timestamp.as_ref().map(|t| t.0))
                .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0))
        })
        .max()
        .map(|t| t.to_string())
}

fn pods_using(pods: &[Pod], namespace: &str, claim: &str) -> Vec<String> {
    let mut names: Vec<String> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| {
            let pod_name = p.metadata.name.as_deref().unwrap_or_default();
            p.spec.iter().flat_map(|s| s.volumes.iter().flatten()).any(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == claim)
                    || (v.ephemeral.is_some() && volplane_runtime::naming::ephemeral_claim(pod_name, &v.name) == claim)
            })
        })
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    names
}

async fn health_rows(client: &kube::Client, namespace: Option<&str>) -> anyhow::Result<Vec<HealthRow>> {
    let pvs = list(Api::<PersistentVolume>::all(client.clone())).await?;
    let (pods, events) = match namespace {
        Some(ns) => (
            list(Api::<Pod>::namespaced(client.clone(), ns)).await?,
            list(Api::<Event>::namespaced(client.clone(), ns)).await?,
        ),
        None => (
            list(Api::<Pod>::all(client.clone())).await?,
            list(Api::<Event>::all(client.clone())).await?,
        ),
    };
    Ok(health_rows_of(&pvs, &pods, &events, namespace))
}

fn health_table(rows: &[HealthRow], all_namespaces: bool) -> String {
    let mut headers = vec!["PVC", "VOLUME", "CONDITION", "SINCE", "PODS"];
    if all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let pods = if row.pods.is_empty() {
                "-".to_string()
            } else {
                row.pods.join(",")
            };
            let mut cells = vec![
                row.claim.clone(),
                row.volume.clone(),
                row.condition.clone(),
                row.since.clone().unwrap_or_else(|| "-".into()),
                pods,
            ];
            if all_namespaces {
                cells.insert(0, row.namespace.clone());
            }
            cells
        })
        .collect();
    if cells.is_empty() {
        return "No volumes held abnormal or on a failed node.\n".to_string();
    }
    table(&headers, &cells)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_line_up_like_kubectl_get() {
        let text = table(
            &["NODE", "CAPACITY"],
            &[vec!["node-0".into(), "100Gi".into()], vec!["n".into(), "5Gi".into()]],
        );
        assert_eq!(text, "NODE     CAPACITY\nnode-0   100Gi\nn        5Gi\n");
    }

    #[test]
    fn health_rows_name_the_claim_its_pods_and_when() {
        let pv: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "pv-1",
            "annotations": {ABNORMAL_ANNOTATION: "disk gone", NODE_FAILED_ANNOTATION: "node-2"}},
            "spec": {"claimRef": {"namespace": "shop", "name": "web-0-data"}}}))
        .expect("pv");
        let healthy: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "pv-2"},
            "spec": {"claimRef": {"namespace": "shop", "name": "other"}}}))
        .expect("pv");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [], "volumes": [{"name": "data", "ephemeral": {}}]}}))
        .expect("pod");
        let event: Event = serde_json::from_value(json!({"metadata": {"name": "e", "namespace": "shop"},
            "involvedObject": {"namespace": "shop", "name": "web-0-data"}, "reason": REASON_ABNORMAL,
            "lastTimestamp": "2026-12-01T10:00:00Z"}))
        .expect("event");
        let rows = health_rows_of(&[pv.clone(), healthy], &[pod], &[event], None);
        let summary: Vec<(&str, &str, Option<&str>, Vec<String>)> = rows
            .iter()
            .map(|r| {
                (
                    r.claim.as_str(),
                    r.condition.as_str(),
                    r.since.as_deref(),
                    r.pods.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "web-0-data",
                    "disk gone",
                    Some("2026-12-01T10:00:00Z"),
                    vec!["web-0".to_string()]
                ),
                ("web-0-data", "node node-2 failed", None, vec!["web-0".to_string()]),
            ]
        );
        assert!(health_rows_of(&[pv], &[], &[], Some("other-ns")).is_empty());
    }
}
