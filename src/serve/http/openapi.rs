//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the table of routes and
//! the schemas of the request and response types (OpenAPI 3.1 schemas are JSON Schema 2020-12,
//! which schemars writes).

use serde_json::{json, Map, Value};

use super::api::PredictionRequest;
use super::error::error_schema;
use super::spec::{Access, Spec, ROUTES};
use crate::serve::service::config::Config;

/// Why each error status is answered.
fn describe(status: u16) -> &'static str {
    match status {
        400 => "The request is malformed or a field is wrong (the error names it)",
        401 => "Missing or unknown API key",
        403 => "The key's role does not allow this, or the data is outside the allowed directories",
        404 => "No such model, pipeline, run, version or prediction",
        409 => "Conflicts with the current state",
        411 => "A body without Content-Length",
        413 => "The body is larger than 8 MiB",
        415 => "The body is not `application/json`",
        422 => "Well-formed but not acceptable (the error says why)",
        429 => "Rate limit or unknown-key limit reached",
        500 => "The server failed (logged with the request id)",
        503 => "Overloaded, or the database cannot take writes",
        _ => "Error",
    }
}

/// Statuses every route of an access may answer.
fn access_errors(access: Access) -> &'static [u16] {
    match access {
        Access::Public => &[],
        Access::Prediction => &[401, 403, 429],
        Access::Key(_) => &[401, 403, 429],
    }
}

fn operation(spec: &Spec, g: &mut schemars::SchemaGenerator) -> Value {
    let mut op = Map::new();
    op.insert("summary".into(), spec.summary.into());
    let mut parameters: Vec<Value> = spec
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "minLength": 1}}))
        .collect();
    if let Some(query) = spec.query {
        let reference = Value::from(query(g));
        let name = reference["$ref"]
            .as_str()
            .and_then(|r| r.rsplit('/').next())
            .unwrap_or_default();
        let schema = g.definitions().get(name).cloned().unwrap_or_default();
        let required: Vec<&Value> = schema["required"].as_array().into_iter().flatten().collect();
        for (field, field_schema) in schema["properties"].as_object().into_iter().flatten() {
            let mut field_schema = field_schema.clone();
            let description = field_schema.as_object_mut().and_then(|o| o.remove("description"));
            parameters.push(
                json!({"name": field, "in": "query", "required": required.contains(&&Value::from(field.as_str())),
                                   "description": description, "schema": field_schema}),
            );
        }
    }
    if !parameters.is_empty() {
        op.insert("parameters".into(), parameters.into());
    }
    if let Some(request) = spec.request {
        op.insert(
            "requestBody".into(),
            json!({"required": true, "content": {"application/json": {"schema": Value::from(request(g))}}}),
        );
    }
    let mut responses = Map::new();
    if let Some(response) = spec.response {
        let mut ok =
            json!({"description": "OK", "content": {"application/json": {"schema": Value::from(response(g))}}});
        if spec.status == 202 {
            ok["description"] = "Accepted".into();
            ok["headers"] =
                json!({"Location": {"description": "Where the run's status is", "schema": {"type": "string"}}});
        }
        responses.insert(spec.status.to_string(), ok);
    }
    let error = Value::from(error_schema(g));
    let mut errors: Vec<u16> = access_errors(spec.access).iter().chain(spec.errors).copied().collect();
    errors.sort_unstable();
    errors.dedup();
    for status in errors {
        let mut answer = json!({"description": describe(status), "content": {"application/json": {"schema": error}}});
        if status == 429 || status == 503 {
            answer["headers"] = json!({"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}});
        }
        if spec.errors_with_body && spec.errors.contains(&status) {
            answer["content"] = responses[&spec.status.to_string()]["content"].clone();
        }
        responses.insert(status.to_string(), answer);
    }
    op.insert("responses".into(), responses.into());
    match spec.access {
        Access::Public => {}
        Access::Key(_) => {
            op.insert("security".into(), json!([{"bearer": []}]));
        }
        // Without a key when the server runs with `--open-prediction`.
        Access::Prediction => {
            op.insert("security".into(), json!([{"bearer": []}, {}]));
        }
    }
    Value::Object(op)
}

/// The document, with the limits this server was started with.
pub fn document(config: &Config) -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut g = settings.into_generator();
    let mut paths = Map::new();
    for spec in ROUTES.iter().filter(|s| s.documented) {
        let op = operation(spec, &mut g);
        let item = paths.entry(spec.path).or_insert_with(|| json!({}));
        item[spec.verb.as_str()] = op;
    }
    let mut schemas = g.take_definitions(true);
    limit_texts(&mut schemas, config);
    for schema in schemas.values_mut() {
        plain_enum(schema);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "sentiflow", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Sentiment predictions, model registry and training runs. Send API keys as \
                                 `Authorization: Bearer <key>` (`sentiflow keys create`)."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key"}},
            "schemas": schemas,
        },
        "paths": paths,
    })
}

/// Writes the `oneOf` of documented constants that schemars makes of an enum whose variants have
/// doc comments as a plain `enum` of strings, each variant's text moved into the description:
/// the common generators (openapi-python-client among them) type a plain `enum` as one, and
/// choke on the `oneOf`.
fn plain_enum(schema: &mut Value) {
    let Some(variants) = schema["oneOf"].as_array() else {
        return;
    };
    let names: Option<Vec<&str>> = variants.iter().map(|v| v["const"].as_str()).collect();
    let Some(names) = names else {
        return;
    };
    let mut description = schema["description"].as_str().unwrap_or_default().to_string();
    for (name, v) in names.iter().zip(variants) {
        if let Some(text) = v["description"].as_str() {
            description.push_str(&format!("\n- `{name}`: {}", text.replace('\n', " ")));
        }
    }
    let names: Vec<Value> = names.into_iter().map(Value::from).collect();
    let object = schema.as_object_mut().expect("a schema with `oneOf` is an object");
    object.remove("oneOf");
    object.insert("type".into(), "string".into());
    object.insert("enum".into(), names.into());
    object.insert("description".into(), description.trim_start().into());
}

/// The texts of `POST /prediction` as this server accepts them: not blank, at most
/// `--max-text-chars` long, `text` or `texts` of 1 to `--max-batch`.
fn limit_texts(schemas: &mut Map<String, Value>, config: &Config) {
    let name = std::any::type_name::<PredictionRequest>()
        .rsplit("::")
        .next()
        .unwrap_or_default();
    let Some(request) = schemas.get_mut(name) else {
        return;
    };
    let text = json!({"type": "string", "pattern": "\\S", "maxLength": config.max_text_chars});
    request["properties"]["text"] = text.clone();
    request["properties"]["texts"] =
        json!({"type": "array", "items": text, "minItems": 1, "maxItems": config.max_batch});
    // Exactly one of `text` and `texts`, said without `oneOf`, which generators (openapi-python-client)
    // read as a union of untyped bodies: `texts` unless `text`, and not both.
    let object = request.as_object_mut().expect("a struct's schema is an object");
    object.insert("if".into(), json!({"required": ["text"]}));
    object.insert("else".into(), json!({"required": ["texts"]}));
    object.insert("not".into(), json!({"required": ["text", "texts"]}));
}
