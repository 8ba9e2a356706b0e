//! `/v1/files`: uploads (streamed into the object store), listing, metadata, content, deletion.

use super::*;

pub(super) const PURPOSES: [&str; 4] = ["batch", "batch_output", "user_data", "evals"];

pub(super) async fn upload_file(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<Json<Value>> {
    let form = form.map_err(|r| ApiError::rejected(r.body_text(), None))?;
    // The file part streams into the object store while the form is read.
    let id = format!("file-{}", nuid::next());
    let (writer, mut reader) = tokio::io::duplex(256 * 1024);
    let (form, stored) = tokio::join!(
        read_upload(form, c.settings.limits.max_bytes, writer),
        c.store_object(&id, &mut reader)
    );
    let up = match (form, stored) {
        (Ok(up), Ok(_)) => up,
        (Err(e), stored) => {
            if stored.is_ok() {
                c.discard_object(&id).await;
            }
            return Err(e);
        }
        (Ok(_), Err(e)) => return Err(e.into()),
    };
    let f = c
        .register_file(id, up.filename, up.purpose, up.bytes, &tenant)
        .await?;
    Ok(Json(f.to_openai()))
}

/// The parts of a Files API upload (the file's bytes went to the caller's writer).
#[derive(Debug)]
pub struct Upload {
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
}

/// Most bytes of a `purpose` part read (OpenAI's purposes are short words).
pub(super) const MAX_PURPOSE_BYTES: usize = 64;

/// Reads an upload's multipart form: exactly one `purpose` (one of OpenAI's) and one `file` of
/// at most `max` bytes, whose bytes are written to `file` as they arrive (and `file` shut
/// down at its end); other parts are skipped. Every problem is a 4xx naming it; the caller
/// discards what reached `file` then.
pub async fn read_upload(
    mut form: Multipart,
    max: u64,
    mut file: impl tokio::io::AsyncWrite + Unpin,
) -> Result<Upload, ApiError> {
    use tokio::io::AsyncWriteExt;
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "the file is larger than the limit of {max} bytes: split the batch into several files"
        ),
        kind: "invalid_request_error",
        param: Some("file"),
        code: Some("file_too_large"),
    };
    let unreadable = |what: &'static str, e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::invalid(format!("unreadable {what}: {e}"), Some(what))
        }
    };
    let mut purpose: Option<Vec<u8>> = None;
    let mut got_file: Option<(String, u64)> = None;
    loop {
        let mut field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => {
                return Err(ApiError::invalid(
                    format!("unreadable multipart body: {e}"),
                    None,
                ))
            }
        };
        let twice = |name: &'static str| {
            ApiError::invalid(
                format!("the form has more than one {name:?} part; send exactly one"),
                Some(name),
            )
        };
        match field.name() {
            Some("purpose") => {
                if purpose.is_some() {
                    return Err(twice("purpose"));
                }
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| unreadable("purpose", e))? {
                    if text.len() + chunk.len() > MAX_PURPOSE_BYTES {
                        return Err(ApiError::invalid(
                            format!("purpose is longer than {MAX_PURPOSE_BYTES} bytes; use one of {PURPOSES:?}"),
                            Some("purpose"),
                        ));
                    }
                    text.extend_from_slice(&chunk);
                }
                purpose = Some(text);
            }
            Some("file") => {
                if got_file.is_some() {
                    return Err(twice("file"));
                }
                let name: String = field
                    .file_name()
                    .unwrap_or("upload.jsonl")
                    .chars()
                    .take(256)
                    .collect();
                let mut bytes = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(|e| unreadable("file", e))? {
                    bytes += chunk.len() as u64;
                    if bytes > max {
                        return Err(too_large());
                    }
                    file.write_all(&chunk).await.map_err(|e| {
                        ApiError::internal(anyhow::anyhow!(e).context("storing the upload"))
                    })?;
                }
                got_file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid("missing required parameter: purpose", Some("purpose")))?;
    let purpose = String::from_utf8_lossy(&purpose).into_owned();
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid(
            format!("purpose {purpose:?} is not supported; use one of {PURPOSES:?}"),
            Some("purpose"),
        ));
    }
    let (filename, bytes) = got_file
        .ok_or_else(|| ApiError::invalid("missing required parameter: file", Some("file")))?;
    file.shutdown()
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e).context("storing the upload")))?;
    Ok(Upload {
        purpose,
        filename,
        bytes,
    })
}

pub(super) async fn list_files(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|r| ApiError::rejected(r.body_text(), None))?;
    let limit = parse_limit(&q, 10_000, 10_000)?;
    let mut files = c.list_files().await?;
    files.retain(|f| owns(f.owner.as_deref(), &tenant));
    if let Some(p) = &q.purpose {
        files.retain(|f| &f.purpose == p);
    }
    if q.order.as_deref() == Some("asc") {
        files.reverse();
    }
    let items = files
        .into_iter()
        .map(|f| (f.id.clone(), f.to_openai()))
        .collect();
    Ok(Json(page(items, q.after.as_deref(), limit)?))
}

pub(super) fn no_file(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"), Some("id"))
}

/// The file `id` if `tenant` owns it (another tenant's file is as good as absent).
pub(super) async fn owned_file(c: &Coordinator, id: &str, tenant: &str) -> ApiResult<FileObject> {
    c.file(id)
        .await?
        .filter(|f| owns(f.owner.as_deref(), tenant))
        .ok_or_else(|| no_file(id))
}

pub(super) async fn get_file(
    Leader(c): Leader,
    Tenant(t): Tenant,
    Id(id): Id,
) -> ApiResult<Json<Value>> {
    Ok(Json(owned_file(&c, &id, &t).await?.to_openai()))
}

pub(super) async fn delete_file(
    Leader(c): Leader,
    Tenant(t): Tenant,
    Id(id): Id,
) -> ApiResult<Json<Value>> {
    owned_file(&c, &id, &t).await?;
    if let Some(batch) = c.batch_using(&id) {
        return Err(ApiError::conflict(
            format!("file {id} is the input of batch {batch}, which is still running; delete it once the batch has ended (or cancel the batch)"),
            "file_in_use",
        ));
    }
    if !c.delete_file(&id).await? {
        return Err(no_file(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

pub(super) async fn file_content(
    Leader(c): Leader,
    Tenant(t): Tenant,
    Id(id): Id,
) -> ApiResult<Response> {
    let f = owned_file(&c, &id, &t).await?;
    let obj = c.file_reader(&id).await?;
    // Streamed in pieces: an output file of gigabytes is never held whole.
    let pieces = futures_util::stream::unfold(Some(obj), |obj| async move {
        use tokio::io::AsyncReadExt;
        let mut obj = obj?;
        let mut buf = vec![0u8; 256 * 1024];
        match obj.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(obj)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, f.bytes.to_string()),
        ],
        Body::from_stream(pieces),
    )
        .into_response())
}
