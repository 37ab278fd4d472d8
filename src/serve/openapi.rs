//! The OpenAPI 3.1 description of the API, served at `/openapi.json`.

use serde_json::{json, Value};

fn error_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for code in codes {
        m.insert(code.to_string(), json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
    }
    Value::Object(m)
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

fn ok(schema: Value) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
}

/// The document, with the limits this server was started with.
pub fn document(config: &super::Config) -> Value {
    let secured = json!([{"bearer": []}]);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "sentiflow", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Sentiment predictions, model registry and training runs."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["code", "message", "request_id"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"}}}}},
                "Prediction": {"type": "object", "required": ["id", "label", "score", "probabilities"], "properties": {
                    "id": {"type": "string"},
                    "label": {"type": "string", "enum": ["negative", "positive"]},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "probabilities": {"type": "object", "properties": {"negative": {"type": "number"}, "positive": {"type": "number"}}},
                    "model": {"type": "string"}, "version": {"type": "string"}}},
                "Text": {"type": "string", "pattern": "\\S", "maxLength": config.max_text_chars},
                "PredictionRequest": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "text": {"$ref": "#/components/schemas/Text"},
                        "texts": {"type": "array", "items": {"$ref": "#/components/schemas/Text"}, "minItems": 1, "maxItems": config.max_batch},
                        "model": {"type": "string"},
                        "explain": {"type": "boolean"}
                    },
                    "oneOf": [{"required": ["text"]}, {"required": ["texts"]}]
                },
                "TrainingRequest": {"type": "object", "required": ["pipeline"], "additionalProperties": false, "properties": {
                    "pipeline": {"type": "string"},
                    "params": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
                    "stages": {"type": "array", "items": {"type": "string"}}}},
                "TrainingRun": {"type": "object", "required": ["id", "pipeline", "status"], "properties": {
                    "id": {"type": "string"}, "pipeline": {"type": "string"},
                    "status": {"type": "string", "enum": ["running", "succeeded", "failed", "interrupted"]},
                    "error": {"type": ["string", "null"]}, "params": {}, "created_at": {"type": "string"},
                    "finished_at": {"type": ["string", "null"]},
                    "stages": {"type": "object", "additionalProperties": {"type": "object"}}}},
                "Model": {"type": "object", "required": ["version", "name", "status"], "properties": {
                    "version": {"type": "string"}, "name": {"type": "string"}, "kind": {"type": "string"},
                    "pipeline": {"type": "string"}, "path": {"type": "string"}, "params": {}, "metrics": {}, "tuning": {},
                    "accuracy": {"type": ["number", "null"]}, "run_id": {"type": ["string", "null"]},
                    "status": {"type": "string", "enum": ["candidate", "production", "archived"]},
                    "created_at": {"type": "string"}, "promoted_at": {"type": ["string", "null"]}}}
            }
        },
        "paths": {
            "/health": {"get": {"summary": "Liveness", "responses": {"200": ok(json!({"type": "object"}))}}},
            "/ready": {"get": {"summary": "Whether a model is loaded", "responses": {
                "200": ok(json!({"type": "object"})), "503": {"description": "No model loaded", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": ok(json!({"type": "object"}))}}},
            "/best_model_parameter": {"get": {
                "summary": "Best hyper-parameters behind a served model",
                "security": secured,
                "parameters": [{"name": "model", "in": "query", "required": false, "schema": {"type": "string", "enum": ["tfidf", "bert"]}}],
                "responses": with(json!({"200": ok(json!({"type": "object", "required": ["model", "version", "parameters"]}))}),
                                  error_responses(&["401", "403", "404", "429"]))}},
            "/prediction": {"post": {
                "summary": "Score one text or a batch",
                "security": secured,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
                "responses": with(json!({"200": ok(json!({"oneOf": [
                    {"$ref": "#/components/schemas/Prediction"},
                    {"type": "object", "required": ["predictions"], "properties": {"predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}, "model": {"type": "string"}, "version": {"type": "string"}}}
                ]}))}), error_responses(&["400", "401", "403", "404", "411", "413", "415", "422", "429", "500", "503"]))}},
            "/feedback": {"post": {"summary": "The true label of an earlier prediction (drift monitoring)", "security": secured,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false,
                    "required": ["prediction_id", "label"], "properties": {"prediction_id": {"type": "string"},
                    "label": {"type": "string", "enum": ["negative", "positive"]}}}}}},
                "responses": with(json!({"200": ok(json!({"type": "object", "required": ["correct"]}))}),
                                  error_responses(&["400", "401", "403", "404", "409", "411", "413", "415", "429", "503"]))}},
            "/pipelines": {"get": {"summary": "Pipelines the server can run, with parameters and stages (admin)", "security": secured,
                "responses": with(json!({"200": ok(json!({"type": "object", "required": ["pipelines"]}))}),
                                  error_responses(&["401", "403", "429"]))}},
            "/drift": {"get": {"summary": "Drift of each served model's recent predictions against its reference", "security": secured,
                "parameters": [{"name": "history", "in": "query", "required": false, "schema": {"type": "string", "enum": ["1"]}}],
                "responses": with(json!({"200": ok(json!({"type": "object", "required": ["models"]}))}),
                                  error_responses(&["400", "401", "403", "429"]))}},
            "/models": {"get": {"summary": "Registered model versions", "security": secured,
                "responses": with(json!({"200": ok(json!({"type": "object", "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}))}),
                                  error_responses(&["401", "403", "429"]))}},
            "/models/{version}/promote": {"post": {"summary": "Serve this version (admin)", "security": secured,
                "parameters": [{"name": "version", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": ok(json!({"type": "object"}))}), error_responses(&["401", "403", "404", "409", "429", "503"]))}},
            "/training": {"post": {"summary": "Start a pipeline run (admin)", "security": secured,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TrainingRequest"}}}},
                "responses": with(json!({"202": {"description": "Started", "headers": {"Location": {"schema": {"type": "string"}}},
                                                  "content": {"application/json": {"schema": {"type": "object", "required": ["id"]}}}}}),
                                  error_responses(&["400", "401", "403", "404", "409", "411", "413", "415", "422", "429", "503"]))}},
            "/training/{id}": {"get": {"summary": "A run's status and stages (admin)", "security": secured,
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": ok(json!({"$ref": "#/components/schemas/TrainingRun"}))}), error_responses(&["401", "403", "404", "429"]))}},
            "/training/{id}/logs": {"get": {"summary": "A run's log lines (admin)", "security": secured,
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": with(json!({"200": ok(json!({"type": "object"}))}), error_responses(&["401", "403", "404", "429"]))}}
        }
    })
}
