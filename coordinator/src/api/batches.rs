//! `/v1/batches`: creation, retrieval (with the `progress` extension), listing, cancellation.

use super::*;

pub(super) async fn create_batch(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    let field = |name: &'static str| -> ApiResult<String> {
        match v.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(ApiError::invalid(
                format!("{name} must be a string, got {other}"),
                Some(name),
            )),
            None => Err(ApiError::invalid(
                format!("missing required parameter: {name}"),
                Some(name),
            )),
        }
    };
    let input_file_id = field("input_file_id")?;
    let endpoint_text = field("endpoint")?;
    let window_text = field("completion_window")?;
    let endpoint = Endpoint::parse(&endpoint_text).ok_or_else(|| {
        ApiError::invalid(
            format!(
                "endpoint {endpoint_text:?} is not supported; use \"/v1/chat/completions\" or \"/v1/completions\""
            ),
            Some("endpoint"),
        )
    })?;
    let window = parse_completion_window(&window_text)
        .map_err(|e| ApiError::invalid(e, Some("completion_window")))?;
    let metadata = match v.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return Err(ApiError::invalid(
                    "metadata may hold at most 16 keys",
                    Some("metadata"),
                ));
            }
            if let Some((k, _)) = m
                .iter()
                .find(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512))
            {
                return Err(ApiError::invalid(
                    format!("metadata[{k:?}]: keys are strings of at most 64 characters, values strings of at most 512"),
                    Some("metadata"),
                ));
            }
            Some(Value::Object(m.clone()))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata must be an object of strings",
                Some("metadata"),
            ))
        }
    };
    let file = c
        .file(&input_file_id)
        .await?
        .filter(|f| owns(f.owner.as_deref(), &tenant))
        .ok_or_else(|| {
            ApiError::not_found(
                format!("No such File object: {input_file_id}"),
                Some("input_file_id"),
            )
        })?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            format!("file {input_file_id} has purpose {:?}; a batch's input file must be uploaded with purpose \"batch\"", file.purpose),
            Some("input_file_id"),
        ));
    }
    let mut rec = BatchRecord::new(
        format!("batch_{}", nuid::next()),
        endpoint,
        input_file_id,
        window_text,
        window,
        metadata,
        now_s(),
    );
    rec.owner = (tenant != DEFAULT_TENANT).then_some(tenant);
    let rec = c.create_batch(rec).await?;
    Ok(Json(rec.to_openai()))
}

pub(super) fn no_batch(id: &str) -> ApiError {
    ApiError::not_found(format!("No such Batch object: {id}"), Some("id"))
}

/// The batch `id` if `tenant` owns it (another tenant's batch is as good as absent).
pub(super) fn owned_batch(c: &Coordinator, id: &str, tenant: &str) -> ApiResult<BatchRecord> {
    c.batch(id)
        .filter(|b| owns(b.owner.as_deref(), tenant))
        .ok_or_else(|| no_batch(id))
}

pub(super) async fn get_batch(
    Leader(c): Leader,
    Tenant(t): Tenant,
    Id(id): Id,
) -> ApiResult<Json<Value>> {
    Ok(Json(batch_json(&c, &owned_batch(&c, &id, &t)?)))
}

/// OpenAI's batch object, and while it runs Gristmill's `progress` extension: the shards the
/// workers say they are running and the tokens those shards' unfinished lines have generated
/// (advisory, between results; `request_counts` and `usage` count finished lines only).
pub(super) fn batch_json(c: &Coordinator, b: &BatchRecord) -> Value {
    let mut v = b.to_openai();
    if b.status == BatchStatus::InProgress {
        let r = c.running(&b.id);
        v["progress"] = serde_json::json!({
            "running_shards": r.shards,
            "running_output_tokens": r.output_tokens,
        });
    }
    v
}

pub(super) async fn list_batches(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|r| ApiError::rejected(r.body_text(), None))?;
    let limit = parse_limit(&q, 20, 100)?;
    let items = c
        .list_batches()
        .into_iter()
        .filter(|b| owns(b.owner.as_deref(), &tenant))
        .map(|b| (b.id.clone(), batch_json(&c, &b)))
        .collect();
    Ok(Json(page(items, q.after.as_deref(), limit)?))
}

pub(super) async fn cancel_batch(
    Leader(c): Leader,
    Tenant(t): Tenant,
    Id(id): Id,
) -> ApiResult<Json<Value>> {
    let rec = owned_batch(&c, &id, &t)?;
    if rec.status.is_terminal() && rec.status != BatchStatus::Cancelled {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "batch {id} is already {:?} and cannot be cancelled",
                crate::server::status_name(rec.status)
            ),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    }
    let rec = c
        .cancel(&id)
        .await
        .map_err(|e| ApiError::store_unavailable(e, "cancelling the batch"))?
        .ok_or_else(|| no_batch(&id))?;
    Ok(Json(rec.to_openai()))
}
