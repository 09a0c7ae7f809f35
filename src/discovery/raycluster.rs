//! KubeRay `RayCluster` objects -> clusters of the routing table (pure mapping, no I/O).
//!
//! Labels: `rayshift.io/shard` (required) names the shard, `rayshift.io/revision` the revision
//! (else the creation time, which orders naturally). The Serve endpoint is KubeRay's
//! `<name>-serve-svc.<namespace>.svc` or the head service's cluster IP, with the port from
//! `.status.endpoints.serve` (default 8000). Readiness: `.status.state == ready` and, where KubeRay
//! sets conditions, `HeadPodReady` true; the gateway's own Serve probes must pass too.

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

/// Maps a RayCluster (`metadata` and `status` as JSON) to a cluster.
pub fn to_cluster(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
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
    let port = |key: &str| -> Option<u16> {
        match status.endpoints.get(key)? {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        }
    };
    let host = match endpoint {
        KubeEndpoint::ServeService => format!("{name}-serve-svc.{namespace}.svc"),
        KubeEndpoint::HeadServiceIp => status
            .head
            .as_ref()
            .and_then(|h| h.service_ip.clone())
            .filter(|ip| !ip.is_empty())
            .ok_or(Unroutable::NoServiceIp)?,
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let url = |port: u16| {
        let text = format!("http://{host}:{port}");
        url::Url::parse(&text).map_err(|_| Unroutable::BadUrl(text))
    };
    let serve_url = url(port("serve").unwrap_or(DEFAULT_SERVE_PORT))?;
    let dashboard_url = port("dashboard").map(url).transpose()?;
    let head_ready = status
        .conditions
        .iter()
        .find(|c| c.kind == "HeadPodReady")
        .is_none_or(|c| c.status == "True");
    let ready = status.state.as_deref() == Some("ready") && head_ready;
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
        let c = to_cluster(&meta, status.as_ref(), KubeEndpoint::ServeService, true).unwrap();
        assert!(c.ready);
        assert_eq!(c.config.name, "shard0-v2");
        assert_eq!(c.config.shard, "shard-0");
        assert_eq!(c.config.revision, "v2");
        assert_eq!(
            c.config.serve_url.as_str(),
            "http://shard0-v2-serve-svc.serving.svc:8000/"
        );
        assert_eq!(
            c.config.dashboard_url.unwrap().as_str(),
            "http://shard0-v2-serve-svc.serving.svc:8265/"
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
        let c = to_cluster(&meta, status.as_ref(), KubeEndpoint::HeadServiceIp, false).unwrap();
        assert_eq!(c.config.serve_url.as_str(), "http://10.96.0.17:18123/");
        assert_eq!(c.config.name, "serving.shard0-v2");
    }

    #[test]
    fn readiness_needs_state_ready_and_head_pod_ready() {
        let (meta, status) =
            fixture(&READY.replace("\"state\": \"ready\"", "\"state\": \"failed\""));
        assert!(
            !to_cluster(&meta, status.as_ref(), KubeEndpoint::ServeService, true)
                .unwrap()
                .ready
        );
        let json = READY.replace(
            "{\"type\": \"HeadPodReady\", \"status\": \"True\"}",
            "{\"type\": \"HeadPodReady\", \"status\": \"False\"}",
        );
        let (meta, status) = fixture(&json);
        assert!(
            !to_cluster(&meta, status.as_ref(), KubeEndpoint::ServeService, true)
                .unwrap()
                .ready
        );
        // Older KubeRay without conditions: the state decides.
        let (meta, status) = fixture(
            r#"{"metadata": {"name": "a", "namespace": "n", "labels": {"rayshift.io/shard": "s"}}, "status": {"state": "ready"}}"#,
        );
        assert!(
            to_cluster(&meta, status.as_ref(), KubeEndpoint::ServeService, true)
                .unwrap()
                .ready
        );
    }

    #[test]
    fn no_status_yet_is_not_ready_and_revision_falls_back_to_creation_time() {
        let (meta, status) = fixture(
            r#"{"metadata": {"name": "new", "namespace": "n", "creationTimestamp": "2026-11-25T09:30:00Z", "labels": {"rayshift.io/shard": "s"}}}"#,
        );
        let c = to_cluster(&meta, status.as_ref(), KubeEndpoint::ServeService, true).unwrap();
        assert!(!c.ready);
        assert!(
            c.config.revision.starts_with("2026-11-25"),
            "{}",
            c.config.revision
        );
        assert_eq!(c.config.serve_url.port(), Some(DEFAULT_SERVE_PORT));
        assert_eq!(
            to_cluster(&meta, status.as_ref(), KubeEndpoint::HeadServiceIp, true).unwrap_err(),
            Unroutable::NoServiceIp
        );
    }

    #[test]
    fn missing_shard_label_is_unroutable() {
        let (meta, status) = fixture(
            r#"{"metadata": {"name": "x", "namespace": "n", "labels": {"app": "y"}}, "status": {"state": "ready"}}"#,
        );
        assert_eq!(
            to_cluster(&meta, status.as_ref(), KubeEndpoint::ServeService, true).unwrap_err(),
            Unroutable::NoShard
        );
    }
}
