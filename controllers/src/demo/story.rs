//! The story, played on the embedded cluster and narrated as it happens:
//! each act does one thing a user or the cluster would do, waits (with a
//! deadline) until volplane's answer is in the API server, and says what it
//! saw and how to see it with kubectl.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::time::Instant;
use volplane_capacity::quantity::format_bytes;
use volplane_health::model::{ABNORMAL_ANNOTATION, REASON_ABNORMAL, REASON_NORMAL, REPORTING_CONTROLLER};
use volplane_tests::driver::TestVolume;

use super::cluster::{self, EmbeddedCluster};
use super::processes::{self, VolplaneProcesses};
use super::scenario::{
    self, ABNORMAL_MESSAGE, APP_NAMESPACE, CLASSES, DB, DRIVER, EphemeralPod, KubectlView, NODES, TOPOLOGY_KEY,
    VOLPLANE_NAMESPACE, WEB,
};
use crate::plugin::{self, PluginArgs};

/// Narration is wrapped at this width (commands and tables are not).
const WIDTH: usize = 100;

/// How long one step may take before the demo gives up on it.
pub const STEP_LIMIT: Duration = Duration::from_secs(60);

/// Writes the narration to stdout.
#[derive(Debug)]
pub struct Narrator<'a> {
    kubeconfig: &'a Path,
}

impl<'a> Narrator<'a> {
    /// Narrates for commands run against `kubeconfig`.
    pub fn new(kubeconfig: &'a Path) -> Self {
        Self { kubeconfig }
    }

    /// Narration, wrapped at [`WIDTH`] columns.
    pub fn say(&self, text: &str) {
        for line in text.lines() {
            // Never split at a hyphen or inside a word: names stay whole.
            let options = textwrap::Options::new(WIDTH)
                .break_words(false)
                .word_splitter(textwrap::WordSplitter::NoHyphenation);
            println!("{}", textwrap::fill(line, options));
        }
        if text.is_empty() {
            println!();
        }
    }

    /// A line as it is (tables, commands).
    pub fn raw(&self, line: &str) {
        println!("{line}");
    }

    /// An act's title.
    pub fn act(&self, number: usize, title: &str) {
        println!("\n== {number}. {title}");
    }

    /// Text shown as it is, indented.
    pub fn show(&self, text: &str) {
        for line in text.lines() {
            if line.trim().is_empty() {
                println!();
            } else {
                println!("    {line}");
            }
        }
    }

    /// The kubectl commands that show the same.
    pub fn views(&self, views: &[KubectlView]) {
        for view in views {
            println!("  {}:", view.shows);
            println!("    {}", scenario::command_line(self.kubeconfig, view));
        }
    }
}

/// Polls `check` until it gives a value, within [`STEP_LIMIT`].
async fn until<T, F, Fut>(what: &str, check: F) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    volplane_tests::wait::until(STEP_LIMIT, what, check).await
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.2} s", elapsed.as_secs_f64())
}

/// A volume the demo provisioned for a claim, standing in for external-provisioner.
#[derive(Debug)]
struct Provisioned {
    /// The node the pod went to.
    node: String,
    /// The PV.
    volume: String,
    /// The driver's volume id.
    handle: String,
}

/// The story on an embedded cluster.
#[derive(Debug)]
pub struct Story<'a> {
    cluster: &'a EmbeddedCluster,
    narrator: Narrator<'a>,
}

impl<'a> Story<'a> {
    /// A story on `cluster`.
    pub fn new(cluster: &'a EmbeddedCluster) -> Self {
        Self {
            cluster,
            narrator: Narrator::new(&cluster.kubeconfig),
        }
    }

    /// Says what runs where.
    pub fn introduce(&self, processes: &VolplaneProcesses) {
        let n = &self.narrator;
        n.say(
            "volplane demo: an API server, CSI drivers and volplane, all on this machine; no real cluster is touched.",
        );
        n.say("");
        n.raw(&format!(
            "  API server  {} (in-process: watches, selectors, garbage collection)",
            self.cluster.api_server.url()
        ));
        n.raw(&format!("  kubeconfig  {}", self.cluster.kubeconfig.display()));
        n.raw(&format!(
            "  CSI driver  {DRIVER} (simulated): one instance per node, one for the controller side"
        ));
        let nodes: Vec<String> = NODES
            .iter()
            .map(|node| {
                let free: Vec<String> = CLASSES
                    .iter()
                    .zip(node.free_gib)
                    .map(|(class, gib)| format!("{} {}", format_bytes(scenario::gib(gib)), class.name))
                    .collect();
                format!("{}: {}", node.name, free.join(", "))
            })
            .collect();
        n.raw(&format!("  nodes       {}", nodes.join("; ")));
        n.raw(&format!(
            "  volplane    {} processes of this binary, production flags, logs in {}:",
            processes.all.len(),
            self.cluster.logs().display()
        ));
        for process in &processes.all {
            n.raw(&format!("    {:<16} {}", process.name, process.role));
            n.raw(&format!("    {:<16} {}", "", process.command_line));
        }
    }

    /// Waits until the controller-side process leads both its groups; the
    /// Leases' names.
    pub async fn leaders(&self) -> anyhow::Result<Vec<String>> {
        let leases: Api<Lease> = Api::namespaced(self.cluster.client.clone(), VOLPLANE_NAMESPACE);
        let groups = [
            crate::startup::EPHEMERAL_LEASE.to_string(),
            crate::startup::health_lease(DRIVER),
        ];
        until("the controller-side process holds its Leases", || async {
            let held = held_leases(&leases).await.ok()?;
            groups
                .iter()
                .all(|group| {
                    held.iter()
                        .any(|(name, holder)| name == group && holder.starts_with(processes::CONTROLLER_POD))
                })
                .then_some(())
        })
        .await?;
        Ok(groups.to_vec())
    }

    /// Plays every act; volplane was started at `started`.
    pub async fn play(&self, started: Instant) -> anyhow::Result<()> {
        self.capacity(started).await?;
        self.ephemeral_claim().await?;
        self.garbage_collection().await?;
        self.health().await?;
        self.leadership().await
    }

    async fn capacity(&self, started: Instant) -> anyhow::Result<()> {
        let n = &self.narrator;
        n.act(1, "Capacity");
        let expected: Vec<(&str, &str, String)> = NODES
            .iter()
            .flat_map(|node| {
                CLASSES
                    .iter()
                    .zip(node.free_gib)
                    .map(|(class, gib)| (node.name, class.name, format_bytes(scenario::gib(gib))))
            })
            .collect();
        until("volplane publishes capacity for every node and class", || async {
            let objects = self.capacities().await?;
            expected
                .iter()
                .all(|(node, class, capacity)| published(&objects, node, class).as_ref() == Some(capacity))
                .then_some(())
        })
        .await?;
        n.say(&format!(
            "Each node's volplane asked its own driver (GetCapacity, once per class) and published one \
             CSIStorageCapacity per node and class, owned by the Node, all in place {} after the processes \
             started. kube-scheduler places pods on these numbers:",
            seconds(started.elapsed())
        ));
        n.show(&self.plugin(&["capacity"]).await?);
        n.views(&[scenario::CAPACITY, scenario::PLUGIN_CAPACITY]);
        Ok(())
    }

    async fn ephemeral_claim(&self) -> anyhow::Result<()> {
        let n = &self.narrator;
        n.act(2, "Generic ephemeral volume");
        n.say(&format!(
            "Pod {APP_NAMESPACE}/{} asks for a {}Gi generic ephemeral volume {:?} of class {}.",
            WEB.name, WEB.gib, WEB.volume, WEB.class
        ));
        let pod = self.create_pod(WEB).await?;
        let (claim, took) = self.owned_claim(WEB, &pod).await?;
        n.say(&format!(
            "volplane created PVC {APP_NAMESPACE}/{claim} {} after the pod, owned by Pod {} (controller), \
             so it lives and dies with the pod. Where the scheduler can place it (`kubectl volplane why {}`):",
            seconds(took),
            WEB.name,
            WEB.name
        ));
        n.show(&self.plugin(&["-n", APP_NAMESPACE, "why", WEB.name]).await?);
        n.views(&[scenario::CLAIMS]);
        Ok(())
    }

    async fn garbage_collection(&self) -> anyhow::Result<()> {
        let n = &self.narrator;
        n.act(3, "Pod deleted, claim collected");
        let pods: Api<Pod> = Api::namespaced(self.cluster.client.clone(), APP_NAMESPACE);
        pods.delete(WEB.name, &DeleteParams::default())
            .await
            .with_context(|| format!("cannot delete pod {}", WEB.name))?;
        let claims = self.claims();
        let claim = WEB.claim();
        until(&format!("garbage collection removes PVC {claim}"), || async {
            matches!(claims.get_opt(&claim).await, Ok(None)).then_some(())
        })
        .await?;
        n.say(&format!(
            "Pod {} deleted; garbage collection removed PVC {claim} with it, because volplane made the pod \
             its owner. (The PVC command above no longer lists it.)",
            WEB.name
        ));
        Ok(())
    }

    async fn health(&self) -> anyhow::Result<()> {
        self.narrator.act(4, "Volume health");
        let pod = self.create_pod(DB).await?;
        let (claim, _) = self.owned_claim(DB, &pod).await?;
        let provisioned = self.provision(&claim, &pod).await?;
        self.abnormal(&claim, &provisioned).await?;
        self.recovery(&claim, &provisioned).await
    }

    async fn abnormal(&self, claim: &str, provisioned: &Provisioned) -> anyhow::Result<()> {
        let n = &self.narrator;
        let Provisioned { volume, handle, .. } = provisioned;
        self.cluster
            .controller_driver
            .put_volume(handle, db_volume(Some(ABNORMAL_MESSAGE)));
        n.say(&format!(
            "The driver now reports volume {handle} abnormal: {ABNORMAL_MESSAGE:?}."
        ));
        let (note, took) = self.health_event(claim, REASON_ABNORMAL).await?;
        let (marked, _) = until(&format!("PV {volume} is annotated abnormal"), || async {
            self.abnormal_annotation(volume).await.flatten()
        })
        .await?;
        n.say(&format!(
            "volplane's health controller (ControllerGetVolume every {}) reported it {} later: Warning \
             {REASON_ABNORMAL} on PVC {APP_NAMESPACE}/{claim}, note {note:?}; PV {volume} annotated \
             {ABNORMAL_ANNOTATION}={marked:?}.",
            humantime::format_duration(processes::HEALTH_CHECK),
            seconds(took)
        ));
        n.views(&[scenario::HEALTH_EVENTS, scenario::ABNORMAL_VOLUMES]);
        Ok(())
    }

    async fn recovery(&self, claim: &str, provisioned: &Provisioned) -> anyhow::Result<()> {
        let n = &self.narrator;
        let Provisioned { volume, handle, .. } = provisioned;
        self.cluster.controller_driver.put_volume(handle, db_volume(None));
        n.say(&format!("The driver reports volume {handle} healthy again."));
        let (note, took) = self.health_event(claim, REASON_NORMAL).await?;
        until(&format!("the abnormal annotation leaves PV {volume}"), || async {
            matches!(self.abnormal_annotation(volume).await, Some(None)).then_some(())
        })
        .await?;
        n.say(&format!(
            "volplane saw the recovery {} later: Normal {REASON_NORMAL} on PVC {APP_NAMESPACE}/{claim}, note \
             {note:?}; the annotation is gone (the same two commands show it).",
            seconds(took)
        ));
        Ok(())
    }

    async fn leadership(&self) -> anyhow::Result<()> {
        let n = &self.narrator;
        n.act(5, "Leader election");
        let leases: Api<Lease> = Api::namespaced(self.cluster.client.clone(), VOLPLANE_NAMESPACE);
        let held = held_leases(&leases).await?;
        n.say(
            "The controller-side process writes only while it holds a Lease per controller group (a second \
             replica would wait); the per-node processes own their node's objects and never elect:",
        );
        let lines: Vec<String> = held.iter().map(|(name, holder)| format!("{name}\t{holder}")).collect();
        n.show(&lines.join("\n"));
        n.views(&[scenario::LEASES]);
        Ok(())
    }

    /// What `kubectl volplane <args>` prints against the demo.
    async fn plugin(&self, args: &[&str]) -> anyhow::Result<String> {
        let argv = std::iter::once("kubectl-volplane").chain(args.iter().copied());
        let args = PluginArgs::try_parse_from(argv).context("the demo's plugin command")?;
        plugin::answer(&self.cluster.client, &args).await
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.cluster.client.clone(), APP_NAMESPACE)
    }

    async fn capacities(&self) -> Option<Vec<CSIStorageCapacity>> {
        let api: Api<CSIStorageCapacity> = Api::namespaced(self.cluster.client.clone(), VOLPLANE_NAMESPACE);
        Some(api.list(&ListParams::default()).await.ok()?.items)
    }

    async fn create_pod(&self, pod: EphemeralPod) -> anyhow::Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.cluster.client.clone(), APP_NAMESPACE);
        let object: Pod = serde_json::from_value(pod.manifest())?;
        pods.create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("cannot create pod {}", pod.name))
    }

    /// Waits for the claim of `pod`'s ephemeral volume, owned by `created`.
    async fn owned_claim(&self, pod: EphemeralPod, created: &Pod) -> anyhow::Result<(String, Duration)> {
        let claims = self.claims();
        let name = pod.claim();
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let what = format!("volplane creates PVC {name} owned by pod {}", pod.name);
        let (_, took) = until(&what, || async {
            let claim = claims.get_opt(&name).await.ok()??;
            let owners = claim.metadata.owner_references.unwrap_or_default();
            owners
                .iter()
                .any(|o| o.kind == "Pod" && o.uid == uid && o.controller == Some(true))
                .then_some(())
        })
        .await?;
        Ok((name, took))
    }

    /// The first node where `pod`'s volume fits, as `kubectl volplane why` judges.
    async fn first_fitting_node(&self, pod: EphemeralPod) -> anyhow::Result<String> {
        let why = plugin::why(&self.cluster.client, APP_NAMESPACE, pod.name).await?;
        why.nodes
            .iter()
            .find(|(_, fits)| fits.iter().all(|f| f.fits))
            .map(|(node, _)| node.clone())
            .with_context(|| format!("no node fits pod {}: {}", pod.name, why.verdict))
    }

    /// Plays kube-scheduler and external-provisioner for the db claim: the
    /// pod goes to the first node where it fits, the node's driver gives
    /// the space up, and a volume on the controller-side driver is bound to
    /// the claim through a PV; volplane refreshes that node's capacity.
    async fn provision(&self, claim: &str, pod: &Pod) -> anyhow::Result<Provisioned> {
        let node = self.first_fitting_node(DB).await?;
        let current = self.claims().get(claim).await?;
        let uid = current.metadata.uid.clone().unwrap_or_default();
        let provisioned = Provisioned {
            volume: format!("pvc-{uid}"),
            handle: format!("vol-{}", uid.chars().take(8).collect::<String>()),
            node,
        };
        let left = self.take_space(&provisioned.node, DB)?;
        self.cluster
            .controller_driver
            .put_volume(&provisioned.handle, db_volume(None));
        self.bind(claim, &uid, pod, &provisioned).await?;
        self.narrator.say(&format!(
            "Pod {} got PVC {claim} from volplane. This demo has no kube-scheduler or external-provisioner, so \
             it plays them: {} goes to {} (where volplane's objects say {}Gi of {} fit), volume {} is created \
             on the driver and PV {} bound to the claim.",
            DB.name, DB.name, provisioned.node, DB.gib, DB.class, provisioned.handle, provisioned.volume
        ));
        let expected = format_bytes(scenario::gib(left));
        let node = provisioned.node.as_str();
        let what = format!("volplane publishes {expected} of {} on {node}", DB.class);
        let (_, took) = until(&what, || async {
            let objects = self.capacities().await?;
            (published(&objects, node, DB.class).as_ref() == Some(&expected)).then_some(())
        })
        .await?;
        self.narrator.say(&format!(
            "{node}'s driver now has {expected} of {} free. The new PV made volplane refresh {node}'s {} \
             capacity at once (without it, the next poll, every {}, would): {expected} published {} later.",
            DB.class,
            DB.class,
            humantime::format_duration(processes::CAPACITY_POLL),
            seconds(took)
        ));
        Ok(provisioned)
    }

    /// The driver on `node` reports `pod`'s size less free; what is left, in GiB.
    fn take_space(&self, node: &str, pod: EphemeralPod) -> anyhow::Result<i64> {
        let spec = NODES.iter().find(|n| n.name == node).context("a demo node")?;
        let index = CLASSES
            .iter()
            .position(|c| c.name == pod.class)
            .context("a demo class")?;
        let driver = self.cluster.node_driver(node).context("a demo node's driver")?;
        let left = spec.free_gib[index] - pod.gib;
        cluster::set_free(driver, *spec, CLASSES[index].media, left);
        Ok(left)
    }

    /// Creates the PV and binds claim and pod as the PV controller and
    /// kube-scheduler would.
    async fn bind(&self, claim: &str, uid: &str, pod: &Pod, provisioned: &Provisioned) -> anyhow::Result<()> {
        let client = &self.cluster.client;
        let Provisioned { node, volume, handle } = provisioned;
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": volume},
            "spec": {"capacity": {"storage": format!("{}Gi", DB.gib)}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": DB.class, "persistentVolumeReclaimPolicy": "Delete",
                     "csi": {"driver": DRIVER, "volumeHandle": handle},
                     "claimRef": {"kind": "PersistentVolumeClaim", "namespace": APP_NAMESPACE, "name": claim, "uid": uid},
                     "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                         {"key": TOPOLOGY_KEY, "operator": "In", "values": [node]}]}]}}},
            "status": {"phase": "Bound"}}))?;
        Api::<PersistentVolume>::all(client.clone())
            .create(&PostParams::default(), &pv)
            .await
            .with_context(|| format!("cannot create PV {volume}"))?;
        let merge = PatchParams::default();
        let claims = self.claims();
        claims
            .patch(
                claim,
                &merge,
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": node}},
                                     "spec": {"volumeName": volume}}),
                ),
            )
            .await
            .with_context(|| format!("cannot bind PVC {claim}"))?;
        claims
            .patch_status(claim, &merge, &Patch::Merge(json!({"status": {"phase": "Bound"}})))
            .await
            .with_context(|| format!("cannot bind PVC {claim}"))?;
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        Api::<Pod>::namespaced(client.clone(), APP_NAMESPACE)
            .patch(&pod_name, &merge, &Patch::Merge(json!({"spec": {"nodeName": node}})))
            .await
            .with_context(|| format!("cannot place pod {pod_name}"))?;
        Ok(())
    }

    /// The note of the health controller's `reason` event on `claim`.
    async fn health_event(&self, claim: &str, reason: &str) -> anyhow::Result<(String, Duration)> {
        let events: Api<Event> = Api::namespaced(self.cluster.client.clone(), APP_NAMESPACE);
        until(&format!("volplane reports {reason} on PVC {claim}"), || async {
            let listed = events.list(&ListParams::default()).await.ok()?.items;
            listed.into_iter().find_map(|event| {
                let about = event.regarding.as_ref()?;
                (event.reason.as_deref() == Some(reason)
                    && about.kind.as_deref() == Some("PersistentVolumeClaim")
                    && about.name.as_deref() == Some(claim)
                    && event.reporting_controller.as_deref() == Some(REPORTING_CONTROLLER))
                .then(|| event.note.unwrap_or_default())
            })
        })
        .await
    }

    /// `None`: the PV cannot be read; `Some(None)`: not annotated.
    async fn abnormal_annotation(&self, volume: &str) -> Option<Option<String>> {
        let pv = Api::<PersistentVolume>::all(self.cluster.client.clone())
            .get(volume)
            .await
            .ok()?;
        Some(
            pv.metadata
                .annotations
                .and_then(|a| a.get(ABNORMAL_ANNOTATION).cloned()),
        )
    }
}

/// The capacity published for `class` on `node` by an object the Node owns.
fn published(objects: &[CSIStorageCapacity], node: &str, class: &str) -> Option<String> {
    objects
        .iter()
        .find(|o| {
            let on_node = o
                .node_topology
                .as_ref()
                .and_then(|t| t.match_labels.as_ref())
                .and_then(|l| l.get(TOPOLOGY_KEY))
                .is_some_and(|v| v == node);
            let owned = o
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.kind == "Node" && r.name == node);
            o.storage_class_name == class && on_node && owned
        })
        .and_then(|o| o.capacity.as_ref())
        .map(|q| q.0.clone())
}

/// The db volume as the controller-side driver reports it.
fn db_volume(abnormal: Option<&str>) -> TestVolume {
    let volume = match abnormal {
        Some(message) => TestVolume::abnormal(message),
        None => TestVolume::healthy(),
    };
    TestVolume {
        capacity_bytes: scenario::gib(DB.gib),
        ..volume
    }
}

/// Each Lease with a holder: (name, holder), by name.
pub async fn held_leases(leases: &Api<Lease>) -> anyhow::Result<Vec<(String, String)>> {
    let listed = leases
        .list(&ListParams::default())
        .await
        .context("cannot list the Leases")?;
    let mut held: Vec<(String, String)> = listed
        .items
        .into_iter()
        .filter_map(|lease| {
            let holder = lease.spec?.holder_identity.filter(|h| !h.is_empty())?;
            Some((lease.metadata.name?, holder))
        })
        .collect();
    held.sort();
    Ok(held)
}
