//! A real kube-apiserver + etcd for the Kubernetes tests: built or taken from the cache by
//! `scripts/kube/install.sh`, started on free ports by `scripts/kube/start.sh`, stopped on drop
//! (also when a test fails).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

/// A running API server with its own data directory.
pub struct KubeEnv {
    pub dir: tempfile::TempDir,
    pub env: BTreeMap<String, String>,
    pub client: Client,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_script(args: &[&str]) -> String {
    let out = Command::new("bash")
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl KubeEnv {
    /// Installs (or finds cached) and starts etcd + kube-apiserver, and installs the RayCluster CRD.
    pub async fn start() -> KubeEnv {
        run_script(&["scripts/kube/install.sh"]);
        // Short path: the API server's socket paths stay well inside limits.
        let dir = tempfile::Builder::new()
            .prefix("rs-kube-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let dir_str = dir.path().to_string_lossy().into_owned();
        let mut env = KubeEnv {
            env: BTreeMap::new(),
            client: Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                .unwrap(),
            dir,
        };
        // From here on, dropping `env` stops the servers.
        run_script(&["scripts/kube/start.sh", &dir_str]);
        env.env = read_env(&env.dir.path().join("env"));
        env.client = env.connect().await;
        env.install_crd().await;
        env
    }

    /// A client from the environment's kubeconfig.
    pub async fn connect(&self) -> Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("client config");
        Client::try_from(config).expect("client")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// `scripts/kube/restart.sh DIR <part> [--kill]`.
    pub fn restart(&self, part: &str, kill: bool) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut args = vec!["scripts/kube/restart.sh", dir.as_str(), part];
        if kill {
            args.push("--kill");
        }
        run_script(&args);
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the API server: frozen, it keeps its connections open
    /// and answers nothing, like a hung server or a half-open connection.
    pub fn freeze_apiserver(&self, frozen: bool) {
        let env = read_env(&self.dir.path().join("env"));
        let pid = &env["APISERVER_PID"];
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, pid.as_str()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    async fn install_crd(&self) {
        let text =
            std::fs::read_to_string(repo().join("deploy/kubernetes/crds/rayclusters.ray.io.yaml"))
                .unwrap();
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("CRD yaml");
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        api.create(&PostParams::default(), &crd)
            .await
            .expect("create CRD");
        for _ in 0..200 {
            let got = api.get("rayclusters.ray.io").await.expect("get CRD");
            let established = got
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                // The discovery cache of the API server needs a moment more.
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("CRD never established");
    }

    /// Creates a namespace.
    pub async fn namespace(&self, name: &str) {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
    }

    /// The RayCluster API of a namespace.
    pub fn rayclusters(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            ns,
            &rayshift::discovery::kube::raycluster_resource(),
        )
    }
}

/// Creates a RayCluster with the rayshift labels, then patches its status to point at `port` on
/// 127.0.0.1 (head_service_ip endpoints), `ready` or not.
pub async fn create_raycluster(
    api: &Api<DynamicObject>,
    name: &str,
    shard: &str,
    revision: &str,
    port: u16,
    ready: bool,
) {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": name, "labels": {"rayshift.io/shard": shard, "rayshift.io/revision": revision}},
        "spec": {"headGroupSpec": {"rayStartParams": {}}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create RayCluster");
    set_status(api, name, port, ready).await;
}

/// Patches a RayCluster's status (through the status subresource, as KubeRay does).
pub async fn set_status(api: &Api<DynamicObject>, name: &str, port: u16, ready: bool) {
    let status = json!({"status": {
        "state": if ready { "ready" } else { "failed" },
        "conditions": [{"type": "HeadPodReady", "status": if ready { "True" } else { "False" }, "reason": "", "message": ""}],
        "head": {"serviceIP": "127.0.0.1", "podIP": "127.0.0.1"},
        "endpoints": {"serve": port.to_string()}
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch status");
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        // A test that failed while the API server was frozen: thaw it so it can stop cleanly.
        // Nothing here may panic (a panic while the test is already panicking aborts the binary
        // before stop.sh runs): a missing env file or a gone process is ignored.
        let thaw = std::fs::read_to_string(self.dir.path().join("env"))
            .ok()
            .and_then(|env| {
                env.lines()
                    .find_map(|l| l.strip_prefix("APISERVER_PID=").map(str::to_string))
            });
        if let Some(pid) = thaw {
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
        let dir = self.dir.path().to_string_lossy().into_owned();
        let _ = Command::new("bash")
            .args(["scripts/kube/stop.sh", &dir])
            .current_dir(repo())
            .status();
    }
}

fn read_env(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .expect("env file")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
