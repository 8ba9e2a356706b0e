//! Applies the autoscaler's decisions through the Kubernetes API: the `scale` subresource of the
//! worker StatefulSet, the only thing the coordinator's Role may patch.
//!
//! A conflict (409, another writer in between) is retried with a fresh read; a missing
//! StatefulSet (404) and missing permissions (403) are errors that say what to fix.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;

/// Why scaling failed.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("StatefulSet {0} not found: deploy the workers (k8s/) or point the coordinator at the right name and namespace")]
    NotFound(String),
    #[error("not allowed to scale StatefulSet {0}: the coordinator's Role must allow get and patch on statefulsets/scale ({1})")]
    Forbidden(String, String),
    #[error("StatefulSet {0} kept changing under us: gave up after {1} attempts")]
    Conflict(String, u32),
    #[error("Kubernetes API: {0}")]
    Api(String),
}

/// The worker StatefulSet's replica count, read and written through `statefulsets/scale`.
#[derive(Clone)]
pub struct WorkerScaler {
    api: Api<StatefulSet>,
    name: String,
    what: String,
}

impl std::fmt::Debug for WorkerScaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerScaler")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

const ATTEMPTS: u32 = 3;

impl WorkerScaler {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            what: format!("{namespace}/{name}"),
        }
    }

    fn error(&self, e: kube::Error) -> ScaleError {
        match e {
            kube::Error::Api(s) if s.is_not_found() => ScaleError::NotFound(self.what.clone()),
            kube::Error::Api(s) if s.is_forbidden() => {
                ScaleError::Forbidden(self.what.clone(), s.message.clone())
            }
            other => ScaleError::Api(other.to_string()),
        }
    }

    /// Desired replicas now (`spec.replicas` of the scale subresource).
    pub async fn replicas(&self) -> Result<u32, ScaleError> {
        let scale = self
            .api
            .get_scale(&self.name)
            .await
            .map_err(|e| self.error(e))?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32)
    }

    /// Sets the replicas; returns the count before. Does nothing when already there.
    pub async fn scale_to(&self, replicas: u32) -> Result<u32, ScaleError> {
        for _ in 0..ATTEMPTS {
            let current = self.replicas().await?;
            if current == replicas {
                return Ok(current);
            }
            let patch = serde_json::json!({"spec": {"replicas": replicas}});
            match self
                .api
                .patch_scale(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(current),
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(self.error(e)),
            }
        }
        Err(ScaleError::Conflict(self.what.clone(), ATTEMPTS))
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{json, Value};
    use tower_test::mock;

    use super::*;

    const PATH: &str = "/apis/apps/v1/namespaces/gristmill/statefulsets/gristmill-worker/scale";

    fn scale(replicas: u32) -> Response<Body> {
        let v = json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": "gristmill-worker", "namespace": "gristmill"},
            "spec": {"replicas": replicas}, "status": {"replicas": replicas}});
        Response::new(Body::from(serde_json::to_vec(&v).expect("json")))
    }

    fn status(code: StatusCode, reason: &str) -> Response<Body> {
        let v = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": format!("statefulsets.apps \"gristmill-worker\": {reason}"), "reason": reason, "code": code.as_u16()});
        let mut r = Response::new(Body::from(serde_json::to_vec(&v).expect("json")));
        *r.status_mut() = code;
        r
    }

    /// What the mock API server expects next, and what it answers.
    enum Step {
        Get(Response<Body>),
        Patch(u32, Response<Body>),
    }

    async fn run(steps: Vec<Step>, target: u32) -> Result<u32, ScaleError> {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            for step in steps {
                let (req, send) = handle.next_request().await.expect("a request");
                assert_eq!(req.uri().path(), PATH);
                match step {
                    Step::Get(resp) => {
                        assert_eq!(req.method(), Method::GET);
                        send.send_response(resp);
                    }
                    Step::Patch(want, resp) => {
                        assert_eq!(req.method(), Method::PATCH);
                        assert_eq!(
                            req.headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok()),
                            Some("application/merge-patch+json")
                        );
                        let body = req.into_body().collect_bytes().await.expect("body");
                        let v: Value = serde_json::from_slice(&body).expect("json body");
                        assert_eq!(v, json!({"spec": {"replicas": want}}));
                        send.send_response(resp);
                    }
                }
            }
        });
        let scaler = WorkerScaler::new(
            Client::new(service, "gristmill"),
            "gristmill",
            "gristmill-worker",
        );
        let result = scaler.scale_to(target).await;
        server
            .await
            .expect("mock server saw exactly the expected requests");
        result
    }

    #[tokio::test]
    async fn scales_with_one_read_and_one_merge_patch() {
        let r = run(vec![Step::Get(scale(2)), Step::Patch(5, scale(5))], 5).await;
        assert_eq!(r.expect("scaled"), 2);
    }

    #[tokio::test]
    async fn does_nothing_when_already_there() {
        let r = run(vec![Step::Get(scale(3))], 3).await;
        assert_eq!(r.expect("no change"), 3);
    }

    #[tokio::test]
    async fn a_conflict_is_retried_with_a_fresh_read() {
        let r = run(
            vec![
                Step::Get(scale(1)),
                Step::Patch(4, status(StatusCode::CONFLICT, "Conflict")),
                Step::Get(scale(2)),
                Step::Patch(4, scale(4)),
            ],
            4,
        )
        .await;
        assert_eq!(r.expect("scaled after a retry"), 2);
    }

    #[tokio::test]
    async fn not_found_and_forbidden_say_what_to_fix() {
        let r = run(
            vec![Step::Get(status(StatusCode::NOT_FOUND, "NotFound"))],
            1,
        )
        .await;
        let e = r.expect_err("404");
        assert!(matches!(e, ScaleError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("gristmill/gristmill-worker"), "{e}");
        let r = run(
            vec![
                Step::Get(scale(0)),
                Step::Patch(2, status(StatusCode::FORBIDDEN, "Forbidden")),
            ],
            2,
        )
        .await;
        let e = r.expect_err("403");
        assert!(matches!(e, ScaleError::Forbidden(..)), "{e}");
        assert!(e.to_string().contains("statefulsets/scale"), "{e}");
    }
}
