//! The Kubernetes watcher: RayCluster objects become clusters while traffic flows.
//!
//! One `kube::runtime::watcher` per watched namespace (or one over all namespaces) lists and then
//! watches `ray.io/v1` RayClusters matching the label selector. The initial list is applied at once
//! (on `InitDone`), later changes one by one. Watch errors back off and resume; while the API
//! server is unreachable the last routing table keeps serving. A second task annotates drained
//! RayClusters `rayshift.io/drained: "true"` (and deletes them with `delete_drained: true`).

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;

use crate::config::{KubeEndpoint, KubernetesConfig};
use crate::control::{ClusterSource, ControlHandle, DiscoveryEvent};
use crate::discovery::raycluster::{
    cluster_name, has_serve_service, to_cluster, DRAINED_ANNOTATION, SERVE_SERVICE_ANNOTATION,
};
use crate::snapshot::Drain;
use crate::telemetry;

/// Errors setting up the Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file could not be read.
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: kube::config::KubeconfigError,
    },
    /// No usable credentials (KUBECONFIG, ~/.kube/config, in-cluster).
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// The kubeconfig could not be turned into a client configuration.
    #[error("Kubernetes client configuration: {0}")]
    Config(#[from] kube::config::KubeconfigError),
}

/// The `ray.io/v1` RayCluster resource.
pub fn raycluster_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("ray.io", "v1", "RayCluster"))
}

/// A client from the configured kubeconfig, else the usual places (KUBECONFIG, in-cluster).
pub async fn client(cfg: &KubernetesConfig) -> Result<Client, KubeError> {
    match &cfg.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            Ok(Client::try_from(config)?)
        }
        None => Ok(Client::try_default().await?),
    }
}

/// Starts one watcher per namespace (all namespaces when none is listed) and the drain annotator.
pub fn spawn(
    client: Client,
    cfg: KubernetesConfig,
    control: ControlHandle,
) -> Vec<tokio::task::JoinHandle<()>> {
    let scopes: Vec<Option<String>> = if cfg.namespaces.is_empty() {
        vec![None]
    } else {
        cfg.namespaces.iter().cloned().map(Some).collect()
    };
    let mut tasks: Vec<_> = scopes
        .into_iter()
        .map(|ns| tokio::spawn(watch(client.clone(), cfg.clone(), ns, control.clone())))
        .collect();
    tasks.push(tokio::spawn(annotate_drained(client, cfg, control)));
    tasks
}

/// Watches one namespace (or all) and feeds the control plane.
async fn watch(
    client: Client,
    cfg: KubernetesConfig,
    namespace: Option<String>,
    control: ControlHandle,
) {
    let ar = raycluster_resource();
    let api: Api<DynamicObject> = match &namespace {
        Some(ns) => Api::namespaced_with(client, ns, &ar),
        None => Api::all_with(client, &ar),
    };
    let single = cfg.namespaces.len() == 1;
    let name_of = |o: &DynamicObject| {
        cluster_name(
            o.metadata.namespace.as_deref().unwrap_or(""),
            o.metadata.name.as_deref().unwrap_or(""),
            single,
        )
    };
    // RayClusters warned about for a missing Serve service, by UID: once per object, not at
    // every status change or relist.
    let warned = std::sync::Mutex::new(HashSet::new());
    let map = |o: &DynamicObject| {
        let first_look = || {
            let id = o.metadata.uid.clone().unwrap_or_else(|| name_of(o));
            warned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id)
        };
        if cfg.endpoint == KubeEndpoint::ServeService
            && !has_serve_service(&o.metadata)
            && first_look()
        {
            tracing::warn!(
                raycluster = %name_of(o),
                "RayCluster has no Serve service: KubeRay creates <name>-serve-svc only with the annotation \
                 {SERVE_SERVICE_ANNOTATION}: \"true\"; annotate it, or set discovery.kubernetes.endpoint: head_service_ip"
            );
        }
        to_cluster(
            &o.metadata,
            o.data.get("spec"),
            o.data.get("status"),
            cfg.endpoint,
            single,
        )
    };
    let watch_cfg = watcher::Config::default().labels(&cfg.label_selector);
    let mut stream = watcher::watcher(api, watch_cfg).default_backoff().boxed();
    let mut initial = Vec::new();
    let scope = namespace.as_deref().unwrap_or("*").to_string();
    tracing::info!(namespace = %scope, selector = %cfg.label_selector, "watching RayClusters");
    while let Some(event) = stream.next().await {
        let (kind, discovery) = match event {
            Err(e) => {
                metrics::counter!(telemetry::KUBE_WATCH_ERRORS_TOTAL, "namespace" => scope.clone())
                    .increment(1);
                tracing::warn!(namespace = %scope, error = %e, "RayCluster watch error; retrying with backoff");
                continue;
            }
            Ok(Event::Init) => {
                initial.clear();
                ("init", None)
            }
            Ok(Event::InitApply(o)) => {
                match map(&o) {
                    Ok(c) => initial.push(c),
                    Err(e) => {
                        tracing::warn!(raycluster = %name_of(&o), reason = %e, "RayCluster not routable")
                    }
                }
                ("init_apply", None)
            }
            Ok(Event::InitDone) => (
                "init_done",
                Some(DiscoveryEvent::Replace {
                    namespace: namespace.clone(),
                    clusters: std::mem::take(&mut initial),
                }),
            ),
            Ok(Event::Apply(o)) => match map(&o) {
                Ok(c) => ("apply", Some(DiscoveryEvent::Upsert(Box::new(c)))),
                Err(e) => {
                    tracing::warn!(raycluster = %name_of(&o), reason = %e, "RayCluster not routable");
                    ("apply", Some(DiscoveryEvent::RemoveDiscovered(name_of(&o))))
                }
            },
            Ok(Event::Delete(o)) => (
                "delete",
                Some(DiscoveryEvent::RemoveDiscovered(name_of(&o))),
            ),
        };
        metrics::counter!(telemetry::KUBE_WATCH_EVENTS_TOTAL, "namespace" => scope.clone(), "event" => kind)
            .increment(1);
        if let Some(discovery) = discovery {
            if control.discovery(discovery).await.is_err() {
                return;
            }
        }
    }
}

/// Marks drained RayClusters with the `rayshift.io/drained` annotation (and deletes them when
/// configured), so an operator or pipeline knows they are safe to remove.
///
/// Only the object that was drained is touched: a RayCluster created after the shift was promoted
/// is a new cluster that happens to reuse the name (weights and shifts are kept by name), so it is
/// left alone, and the delete carries the object's UID as a precondition. Objects handled are
/// remembered by UID.
/// (With several replicas sharing the state, a drain lasts its whole `drain_timeout`: the leader
/// cannot see the other replicas' requests.)
async fn annotate_drained(client: Client, cfg: KubernetesConfig, control: ControlHandle) {
    let ar = raycluster_resource();
    let mut done: HashSet<String> = HashSet::new();
    // When to look at a drained cluster's object again: once handled (or when reading, marking
    // or deleting it failed, e.g. without RBAC for it), not before a pause, so a drained cluster
    // that stays costs one read per pause and a failure is logged once per pause. A RayCluster
    // recreated under the name is looked at within one pause.
    let mut next_look: std::collections::HashMap<(String, String), tokio::time::Instant> =
        std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if !control.is_leader() {
            continue;
        }
        let snapshot = control.snapshot();
        for (cluster, view) in snapshot.clusters.iter().zip(&snapshot.views) {
            let (Some(Drain::Drained), ClusterSource::Kubernetes { namespace, name }) =
                (view.drain, &view.source)
            else {
                continue;
            };
            let now = tokio::time::Instant::now();
            let key = (namespace.clone(), name.clone());
            if next_look.get(&key).is_some_and(|at| now < *at) {
                continue;
            }
            next_look.insert(key, now + RETRY_PAUSE);
            let promoted_at = snapshot
                .shifts
                .get(&*cluster.shard)
                .and_then(|s| s.promoted_at);
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
            let object = match api.get_opt(name).await {
                Ok(Some(object)) => object,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%namespace, raycluster = %name, error = %e, retry_in = ?RETRY_PAUSE, "reading drained RayCluster failed");
                    continue;
                }
            };
            let Some(uid) = object.metadata.uid.clone() else {
                continue;
            };
            if done.contains(&uid) {
                continue;
            }
            if !drained_object(&object, promoted_at) {
                tracing::info!(
                    %namespace, raycluster = %name, %uid,
                    "RayCluster was created after its name's shift was promoted: not the drained one, left alone"
                );
                done.insert(uid);
                continue;
            }
            let patch = serde_json::json!({"metadata": {"annotations": {DRAINED_ANNOTATION: "true"}, "uid": uid}});
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(%namespace, raycluster = %name, "annotated drained RayCluster");
                    if cfg.delete_drained {
                        let only_this = DeleteParams {
                            preconditions: Some(kube::api::Preconditions {
                                uid: Some(uid.clone()),
                                resource_version: None,
                            }),
                            ..DeleteParams::default()
                        };
                        match api.delete(name, &only_this).await {
                            Ok(_) => {
                                tracing::info!(%namespace, raycluster = %name, "deleted drained RayCluster")
                            }
                            Err(e) => {
                                tracing::warn!(%namespace, raycluster = %name, error = %e, retry_in = ?RETRY_PAUSE, "deleting drained RayCluster failed");
                                continue;
                            }
                        }
                    }
                    done.insert(uid);
                }
                Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409 | 422) => {
                    // Gone, or replaced by a new object (the UID in the patch no longer matches).
                    done.insert(uid);
                }
                Err(e) => {
                    tracing::warn!(%namespace, raycluster = %name, error = %e, retry_in = ?RETRY_PAUSE, "annotating drained RayCluster failed");
                }
            }
        }
    }
}

/// Pause before looking at a drained RayCluster again (after handling it, or after a failure).
const RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Whether `object` is the RayCluster its shift drained: created before the shift was promoted
/// (`promoted_at`, Unix seconds; unknown for shifts stored by older versions, which are trusted).
fn drained_object(object: &DynamicObject, promoted_at: Option<u64>) -> bool {
    let (Some(promoted_at), Some(created)) = (promoted_at, &object.metadata.creation_timestamp)
    else {
        return true;
    };
    // Timestamps have whole seconds: an object created in the promotion's second counts as the
    // drained one (a cluster is normally created long before its traffic is shifted away).
    let created = created.0.as_second();
    created <= i64::try_from(promoted_at).unwrap_or(i64::MAX)
}
