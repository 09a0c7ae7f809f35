//! KubeRay `RayCluster` objects -> clusters of the routing table (pure mapping, no I/O).
//!
//! Labels: `rayshift.io/shard` (required) names the shard, `rayshift.io/revision` the revision
//! (else the creation time, which orders naturally). The Serve endpoint is KubeRay's Serve service
//! (`<name>-serve-svc.<namespace>.svc`, named as KubeRay names it) or the head service's cluster
//! IP, with the port from `.status.endpoints.serve` (default 8000). The dashboard is on the head
//! pod, so it is always reached through the head service (its name from `.status.head.serviceName`,
//! else KubeRay's `<name>-head-svc`; or its cluster IP), port `.status.endpoints.dashboard`.
//!
//! KubeRay writes a service port's *node* port into `.status.endpoints` when the head service has
//! one (`spec.headGroupSpec.serviceType: NodePort` or `LoadBalancer`), and a named target port as
//! its name. Neither is a port of the service's cluster IP, so then the port comes from the head
//! container's port of that name in `spec.headGroupSpec.template` (KubeRay's services expose the
//! container ports as they are), else the default.
//! Readiness: the condition `HeadPodReady` true (older KubeRay without conditions:
//! `.status.state == ready`), not suspended (`spec.suspend`, the conditions `RayClusterSuspending`
//! and `RayClusterSuspended`, or state `suspended`) and not being deleted; the gateway's own Serve
//! probes must pass too. Serve runs its proxy on the head, and the probes see whether its
//! applications are up, so workers still pending (a GPU node being provisioned) do not hold a
//! cluster back, as they hold back `.status.state`, which is `ready` only once every pod runs.

use serde::Deserialize;
use serde_json::Value;

use crate::config::{ClusterConfig, KubeEndpoint};
use crate::control::{ClusterSource, DiscoveredCluster};

/// Label naming a RayCluster's shard.
pub const SHARD_LABEL: &str = "rayshift.io/shard";
/// Label naming a RayCluster's revision.
pub const REVISION_LABEL: &str = "rayshift.io/revision";
/// Annotation set on a RayCluster once it is drained.
pub const DRAINED_ANNOTATION: &str = "rayshift.io/drained";
/// Serve's port when `.status.endpoints.serve` is absent.
pub const DEFAULT_SERVE_PORT: u16 = 8000;
/// The Ray dashboard's port when the head service's dashboard port is a node port and the head
/// container names no `dashboard` port.
pub const DEFAULT_DASHBOARD_PORT: u16 = 8265;

/// Why a RayCluster is not (or no longer) a routable cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// The object has no name or namespace.
    #[error("object has no name or namespace")]
    NoName,
    /// The shard label is missing or empty.
    #[error("label {SHARD_LABEL} is missing")]
    NoShard,
    /// `head_service_ip` endpoints need `.status.head.serviceIP`, which is not set yet.
    #[error(".status.head.serviceIP is not set yet")]
    NoServiceIp,
    /// The endpoint does not form a valid URL.
    #[error("serve endpoint {0} is not a valid URL")]
    BadUrl(String),
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Status {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    conditions: Vec<Condition>,
    #[serde(default)]
    head: Option<Head>,
    #[serde(default)]
    endpoints: std::collections::BTreeMap<String, Value>,
}

/// The parts of `.spec` that tell which port a service exposes.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    head_group_spec: HeadGroupSpec,
    /// `spec.suspend`: KubeRay deletes the cluster's pods.
    #[serde(default)]
    suspend: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct HeadGroupSpec {
    #[serde(default)]
    service_type: Option<String>,
    /// A head service template (`headService`), whose `spec.type` overrides `serviceType`.
    #[serde(default)]
    head_service: Option<ServiceTemplate>,
    #[serde(default)]
    template: PodTemplate,
}

#[derive(Deserialize, Default)]
struct ServiceTemplate {
    #[serde(default)]
    spec: ServiceSpec,
}

#[derive(Deserialize, Default)]
struct ServiceSpec {
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize, Default)]
struct PodTemplate {
    #[serde(default)]
    spec: PodSpec,
}

#[derive(Deserialize, Default)]
struct PodSpec {
    #[serde(default)]
    containers: Vec<Container>,
}

#[derive(Deserialize, Default)]
struct Container {
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    #[serde(default)]
    name: Option<String>,
    container_port: u16,
}

impl Spec {
    /// The head container's port named `name`.
    fn container_port(&self, name: &str) -> Option<u16> {
        self.head_group_spec
            .template
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    }

    /// Whether KubeRay's `.status.endpoints` hold node ports (a head service with node ports).
    fn node_ports(&self) -> bool {
        let head = &self.head_group_spec;
        let kind = head
            .head_service
            .as_ref()
            .and_then(|s| s.spec.kind.as_deref())
            .or(head.service_type.as_deref());
        matches!(kind, Some("NodePort" | "LoadBalancer"))
    }
}

#[derive(Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default, rename = "serviceIP")]
    service_ip: Option<String>,
    #[serde(default)]
    service_name: Option<String>,
}

/// A Kubernetes object name as KubeRay derives it (`utils.CheckName`): longer than 50 characters,
/// it keeps the last 50; a leading digit or punctuation becomes `r`.
fn kuberay_name(s: &str) -> String {
    const MAX: usize = 50;
    // Object names are ASCII (DNS labels), so byte offsets are character offsets.
    let mut s = if s.len() > MAX && s.is_ascii() {
        s[s.len() - MAX..].to_string()
    } else {
        s.to_string()
    };
    if s.starts_with(|c: char| c.is_ascii_digit() || c.is_ascii_punctuation()) {
        s.replace_range(..1, "r");
    }
    s
}

/// Name of the cluster in the gateway for RayCluster `namespace/name`: the object name when one
/// namespace is watched, `namespace.name` otherwise (names must be unique in the gateway).
pub fn cluster_name(namespace: &str, name: &str, single_namespace: bool) -> String {
    if single_namespace {
        name.to_string()
    } else {
        format!("{namespace}.{name}")
    }
}

/// The annotation that makes KubeRay create a RayCluster's Serve service `<name>-serve-svc`.
pub const SERVE_SERVICE_ANNOTATION: &str = "ray.io/enable-serve-service";

/// Whether KubeRay creates `<name>-serve-svc` for this RayCluster: only when it is annotated
/// `ray.io/enable-serve-service: "true"`. (A RayService's Serve service is named after the
/// RayService, not after its RayClusters: use `head_service_ip` for those.)
pub fn has_serve_service(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> bool {
    metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVE_SERVICE_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// Maps a RayCluster (`metadata`, and `spec` and `status` as JSON) to a cluster.
pub fn to_cluster(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: Option<&Value>,
    status: Option<&Value>,
    endpoint: KubeEndpoint,
    single_namespace: bool,
) -> Result<DiscoveredCluster, Unroutable> {
    let name = metadata.name.as_deref().ok_or(Unroutable::NoName)?;
    let namespace = metadata.namespace.as_deref().ok_or(Unroutable::NoName)?;
    let labels = metadata.labels.as_ref();
    let shard = labels
        .and_then(|l| l.get(SHARD_LABEL))
        .filter(|s| !s.is_empty())
        .ok_or(Unroutable::NoShard)?;
    let revision = labels
        .and_then(|l| l.get(REVISION_LABEL))
        .filter(|s| !s.is_empty())
        .cloned()
        .or_else(|| {
            metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
        })
        .unwrap_or_else(|| "0".to_string());
    let status: Status = status
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    let spec: Spec = spec
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    // The port of the service port named `key`: `None` when the status does not list it.
    let port = |key: &str| -> Option<u16> {
        let listed = match status.endpoints.get(key)? {
            Value::String(s) => s.parse::<u16>().map_err(|_| s.as_str()),
            Value::Number(n) => Ok(n.as_u64().and_then(|n| u16::try_from(n).ok())?),
            _ => return None,
        };
        match listed {
            Ok(port) if !spec.node_ports() => Some(port),
            // A node port: the container port behind it, as the service exposes it.
            Ok(_) => Some(spec.container_port(key).unwrap_or(match key {
                "dashboard" => DEFAULT_DASHBOARD_PORT,
                _ => DEFAULT_SERVE_PORT,
            })),
            // A named target port: the container port of that name.
            Err(target) => spec.container_port(target).or(spec.container_port(key)),
        }
    };
    let head = status.head.as_ref();
    let non_empty = |v: Option<&String>| v.filter(|s| !s.is_empty()).cloned();
    let (serve_host, head_host) = match endpoint {
        KubeEndpoint::ServeService => {
            // KubeRay's Serve service only has the Serve port; the dashboard is on the head
            // service.
            let head_service = non_empty(head.and_then(|h| h.service_name.as_ref()))
                .unwrap_or_else(|| kuberay_name(&format!("{name}-head-svc")));
            (
                format!(
                    "{}.{namespace}.svc",
                    kuberay_name(&format!("{name}-serve-svc"))
                ),
                format!("{head_service}.{namespace}.svc"),
            )
        }
        KubeEndpoint::HeadServiceIp => {
            let ip = non_empty(head.and_then(|h| h.service_ip.as_ref()))
                .ok_or(Unroutable::NoServiceIp)?;
            (ip.clone(), ip)
        }
    };
    let url = |host: &str, port: u16| {
        let text = if host.contains(':') && !host.starts_with('[') {
            format!("http://[{host}]:{port}")
        } else {
            format!("http://{host}:{port}")
        };
        url::Url::parse(&text).map_err(|_| Unroutable::BadUrl(text))
    };
    let serve_url = url(&serve_host, port("serve").unwrap_or(DEFAULT_SERVE_PORT))?;
    let dashboard_url = port("dashboard").map(|p| url(&head_host, p)).transpose()?;
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.kind == kind)
            .map(|c| c.status == "True")
    };
    let head_ready = condition("HeadPodReady").unwrap_or(status.state.as_deref() == Some("ready"));
    // Suspending: KubeRay deletes the pods while the head still reads ready.
    let suspended = spec.suspend == Some(true)
        || condition("RayClusterSuspending") == Some(true)
        || condition("RayClusterSuspended") == Some(true)
        || status.state.as_deref() == Some("suspended");
    // Marked for deletion (a foreground delete, or a finalizer such as KubeRay's GCS
    // fault-tolerance cleanup holding the object): its pods and services are going away while
    // the status still says "ready", so it takes no new traffic from this moment.
    let deleting = metadata.deletion_timestamp.is_some();
    let ready = head_ready && !suspended && !deleting;
    Ok(DiscoveredCluster {
        config: ClusterConfig {
            name: cluster_name(namespace, name, single_namespace),
            shard: shard.clone(),
            revision,
            serve_url,
            dashboard_url,
            weight: None,
        },
        ready,
        source: ClusterSource::Kubernetes {
            namespace: namespace.to_string(),
            name: name.to_string(),
        },
        created: metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| u64::try_from(t.0.as_second()).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn fixture(json: &str) -> (ObjectMeta, Option<Value>) {
        let v: Value = serde_json::from_str(json).unwrap();
        let meta: ObjectMeta = serde_json::from_value(v["metadata"].clone()).unwrap();
        (meta, v.get("status").cloned())
    }

    /// The cluster of a RayCluster without `spec`, through the Serve service, one namespace.
    fn serve_service(
        meta: &ObjectMeta,
        status: Option<&Value>,
    ) -> Result<DiscoveredCluster, Unroutable> {
        to_cluster(meta, None, status, KubeEndpoint::ServeService, true)
    }

    /// The cluster of a RayCluster with `spec`, through the Serve service, one namespace.
    fn serve_service_with(
        meta: &ObjectMeta,
        spec: &Value,
        status: &Value,
    ) -> Result<DiscoveredCluster, Unroutable> {
        to_cluster(
            meta,
            Some(spec),
            Some(status),
            KubeEndpoint::ServeService,
            true,
        )
    }

    /// `READY` with `spec` and `status.endpoints` replaced.
    fn with_service(spec: &str, endpoints: &str) -> (ObjectMeta, Value, Value) {
        let (meta, status) = fixture(READY);
        let mut status = status.unwrap();
        status["endpoints"] = serde_json::from_str(endpoints).unwrap();
        (meta, serde_json::from_str(spec).unwrap(), status)
    }

    const HEAD_PORTS: &str = r#"{"headGroupSpec": {"serviceType": "NodePort", "template": {"spec": {"containers": [
        {"name": "ray-head", "ports": [{"name": "gcs-server", "containerPort": 6379},
                                       {"name": "dashboard", "containerPort": 8266},
                                       {"name": "serve", "containerPort": 9000}]}]}}}}"#;

    #[test]
    fn node_ports_in_the_status_are_not_the_services_ports() {
        // KubeRay lists the node ports of a NodePort head service; the service's cluster IP (and
        // the Serve service) answer on the container ports.
        let (meta, spec, status) = with_service(
            HEAD_PORTS,
            r#"{"serve": "31234", "dashboard": "30265", "client": "30001"}"#,
        );
        for endpoint in [KubeEndpoint::ServeService, KubeEndpoint::HeadServiceIp] {
            let c = to_cluster(&meta, Some(&spec), Some(&status), endpoint, true).unwrap();
            assert_eq!(c.config.serve_url.port(), Some(9000), "{endpoint:?}");
            assert_eq!(
                c.config.dashboard_url.unwrap().port(),
                Some(8266),
                "{endpoint:?}"
            );
        }
        // The type from a headService template.
        let templated = HEAD_PORTS.replace(
            r#""serviceType": "NodePort""#,
            r#""headService": {"spec": {"type": "NodePort"}}"#,
        );
        let (meta, spec, status) = with_service(&templated, r#"{"serve": "31234"}"#);
        let c = serve_service_with(&meta, &spec, &status).unwrap();
        assert_eq!(c.config.serve_url.port(), Some(9000));
        // Without named container ports: the defaults.
        let bare = r#"{"headGroupSpec": {"serviceType": "LoadBalancer"}}"#;
        let (meta, spec, status) =
            with_service(bare, r#"{"serve": "31234", "dashboard": "30265"}"#);
        let c = serve_service_with(&meta, &spec, &status).unwrap();
        assert_eq!(c.config.serve_url.port(), Some(DEFAULT_SERVE_PORT));
        assert_eq!(
            c.config.dashboard_url.unwrap().port(),
            Some(DEFAULT_DASHBOARD_PORT)
        );
    }

    #[test]
    fn a_named_target_port_is_the_container_port_of_that_name() {
        let spec = HEAD_PORTS.replace("NodePort", "ClusterIP");
        let (meta, spec, status) =
            with_service(&spec, r#"{"serve": "serve", "dashboard": "8265"}"#);
        let c = serve_service_with(&meta, &spec, &status).unwrap();
        assert_eq!(c.config.serve_url.port(), Some(9000));
        // A ClusterIP service: the listed port is the service's own.
        assert_eq!(c.config.dashboard_url.unwrap().port(), Some(8265));
    }

    const READY: &str = r#"{
      "apiVersion": "ray.io/v1", "kind": "RayCluster",
      "metadata": {"name": "shard0-v2", "namespace": "serving", "creationTimestamp": "2026-11-20T10:00:00Z",
                   "labels": {"rayshift.io/shard": "shard-0", "rayshift.io/revision": "v2"}},
      "status": {"state": "ready",
                 "conditions": [{"type": "RayClusterProvisioned", "status": "True"}, {"type": "HeadPodReady", "status": "True"}],
                 "head": {"podIP": "10.1.2.3", "serviceIP": "10.96.0.17", "serviceName": "shard0-v2-head-svc"},
                 "endpoints": {"client": "10001", "dashboard": "8265", "serve": "8000"},
                 "readyWorkerReplicas": 2, "desiredWorkerReplicas": 2}
    }"#;

    #[test]
    fn ready_raycluster_via_serve_service() {
        let (meta, status) = fixture(READY);
        let c = serve_service(&meta, status.as_ref()).unwrap();
        assert!(c.ready);
        assert_eq!(
            c.created,
            Some(1_795_168_800),
            "creationTimestamp in Unix seconds"
        );
        assert_eq!(c.config.name, "shard0-v2");
        assert_eq!(c.config.shard, "shard-0");
        assert_eq!(c.config.revision, "v2");
        assert_eq!(
            c.config.serve_url.as_str(),
            "http://shard0-v2-serve-svc.serving.svc:8000/"
        );
        assert_eq!(
            c.config.dashboard_url.unwrap().as_str(),
            "http://shard0-v2-head-svc.serving.svc:8265/",
            "the dashboard is on the head service (the Serve service has only the Serve port)"
        );
        assert_eq!(
            c.source,
            ClusterSource::Kubernetes {
                namespace: "serving".into(),
                name: "shard0-v2".into()
            }
        );
    }

    #[test]
    fn head_service_ip_and_ports_from_status() {
        let json = READY.replace("\"serve\": \"8000\"", "\"serve\": \"18123\"");
        let (meta, status) = fixture(&json);
        let c = to_cluster(
            &meta,
            None,
            status.as_ref(),
            KubeEndpoint::HeadServiceIp,
            false,
        )
        .unwrap();
        assert_eq!(c.config.serve_url.as_str(), "http://10.96.0.17:18123/");
        assert_eq!(
            c.config.dashboard_url.unwrap().as_str(),
            "http://10.96.0.17:8265/"
        );
        assert_eq!(c.config.name, "serving.shard0-v2");
    }

    /// Service names as KubeRay makes them: long names keep their last 50 characters, a leading
    /// digit becomes `r`; without `.status.head.serviceName` the head service is `<name>-head-svc`.
    #[test]
    fn service_names_follow_kuberay() {
        let long = "a-very-long-raycluster-name-for-a-model-v20261126";
        assert_eq!(long.len(), 49);
        let json = READY
            .replace("\"name\": \"shard0-v2\"", &format!("\"name\": \"{long}\""))
            .replace(", \"serviceName\": \"shard0-v2-head-svc\"", "");
        let (meta, status) = fixture(&json);
        let c = serve_service(&meta, status.as_ref()).unwrap();
        let serve = format!("{long}-serve-svc");
        let serve = &serve[serve.len() - 50..];
        assert_eq!(
            c.config.serve_url.host_str(),
            Some(format!("{serve}.serving.svc").as_str())
        );
        let head = format!("{long}-head-svc");
        let head = &head[head.len() - 50..];
        assert_eq!(
            c.config.dashboard_url.unwrap().host_str(),
            Some(format!("{head}.serving.svc").as_str())
        );
        assert_eq!(kuberay_name("7b-serve-svc"), "rb-serve-svc");
        assert_eq!(kuberay_name("short-serve-svc"), "short-serve-svc");
    }

    #[test]
    fn readiness_follows_the_head_pod_and_suspension() {
        // A worker that failed or is still pending (state not `ready`): the head serves.
        let (meta, status) =
            fixture(&READY.replace("\"state\": \"ready\"", "\"state\": \"failed\""));
        assert!(serve_service(&meta, status.as_ref()).unwrap().ready);
        for suspending in [
            r#"{"type": "RayClusterSuspending", "status": "True"}"#,
            r#"{"type": "RayClusterSuspended", "status": "True"}"#,
        ] {
            let json = READY.replace(
                r#"{"type": "RayClusterProvisioned", "status": "True"}"#,
                suspending,
            );
            let (meta, status) = fixture(&json);
            assert!(
                !serve_service(&meta, status.as_ref()).unwrap().ready,
                "{suspending}"
            );
        }
        let (meta, status) = fixture(READY);
        let suspend = serde_json::json!({"suspend": true});
        let c = serve_service_with(&meta, &suspend, status.as_ref().unwrap()).unwrap();
        assert!(!c.ready, "spec.suspend");
        let json = READY.replace("\"state\": \"ready\"", "\"state\": \"suspended\"");
        let (meta, status) = fixture(&json);
        assert!(!serve_service(&meta, status.as_ref()).unwrap().ready);
        let json = READY.replace(
            "{\"type\": \"HeadPodReady\", \"status\": \"True\"}",
            "{\"type\": \"HeadPodReady\", \"status\": \"False\"}",
        );
        let (meta, status) = fixture(&json);
        assert!(!serve_service(&meta, status.as_ref()).unwrap().ready);
        // Older KubeRay without conditions: the state decides.
        let (meta, status) = fixture(
            r#"{"metadata": {"name": "a", "namespace": "n", "labels": {"rayshift.io/shard": "s"}}, "status": {"state": "ready"}}"#,
        );
        assert!(serve_service(&meta, status.as_ref()).unwrap().ready);
        let (meta, status) = fixture(
            r#"{"metadata": {"name": "a", "namespace": "n", "labels": {"rayshift.io/shard": "s"}}, "status": {"state": "failed"}}"#,
        );
        assert!(!serve_service(&meta, status.as_ref()).unwrap().ready);
    }

    #[test]
    fn serve_service_needs_kuberays_annotation() {
        let (meta, _) = fixture(READY);
        assert!(!has_serve_service(&meta));
        let json = READY.replace(
            "\"creationTimestamp\"",
            "\"annotations\": {\"ray.io/enable-serve-service\": \"true\"}, \"creationTimestamp\"",
        );
        let (meta, _) = fixture(&json);
        assert!(has_serve_service(&meta));
        // A RayService's cluster: its Serve service is named after the RayService.
        let json = READY.replace(
            "\"creationTimestamp\"",
            "\"ownerReferences\": [{\"apiVersion\": \"ray.io/v1\", \"kind\": \"RayService\", \"name\": \"svc\", \"uid\": \"u1\"}], \"creationTimestamp\"",
        );
        let (meta, _) = fixture(&json);
        assert!(!has_serve_service(&meta));
    }

    #[test]
    fn a_raycluster_marked_for_deletion_is_not_ready() {
        let json = READY.replace(
            "\"creationTimestamp\": \"2026-11-20T10:00:00Z\",",
            "\"creationTimestamp\": \"2026-11-20T10:00:00Z\", \"deletionTimestamp\": \"2026-11-21T08:00:00Z\", \"finalizers\": [\"ray.io/gcs-ft-redis-cleanup-finalizer\"],",
        );
        let (meta, status) = fixture(&json);
        assert!(meta.deletion_timestamp.is_some());
        assert!(!serve_service(&meta, status.as_ref()).unwrap().ready);
    }

    #[test]
    fn no_status_yet_is_not_ready_and_revision_falls_back_to_creation_time() {
        let (meta, status) = fixture(
            r#"{"metadata": {"name": "new", "namespace": "n", "creationTimestamp": "2026-11-25T09:30:00Z", "labels": {"rayshift.io/shard": "s"}}}"#,
        );
        let c = serve_service(&meta, status.as_ref()).unwrap();
        assert!(!c.ready);
        assert!(
            c.config.revision.starts_with("2026-11-25"),
            "{}",
            c.config.revision
        );
        assert_eq!(c.config.serve_url.port(), Some(DEFAULT_SERVE_PORT));
        assert_eq!(
            to_cluster(
                &meta,
                None,
                status.as_ref(),
                KubeEndpoint::HeadServiceIp,
                true
            )
            .unwrap_err(),
            Unroutable::NoServiceIp
        );
    }

    #[test]
    fn missing_shard_label_is_unroutable() {
        let (meta, status) = fixture(
            r#"{"metadata": {"name": "x", "namespace": "n", "labels": {"app": "y"}}, "status": {"state": "ready"}}"#,
        );
        assert_eq!(
            serve_service(&meta, status.as_ref()).unwrap_err(),
            Unroutable::NoShard
        );
    }
}
