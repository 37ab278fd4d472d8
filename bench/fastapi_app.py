"""The reference service: a scikit-learn TF-IDF + logistic regression pipeline behind FastAPI.

Started by bench/api.py with `uvicorn fastapi_app:app --workers 2`; SENTIFLOW_BENCH_MODEL names
the joblib file of the fitted pipeline.
"""

import os

import joblib
from fastapi import FastAPI
from pydantic import BaseModel

model = joblib.load(os.environ["SENTIFLOW_BENCH_MODEL"])
app = FastAPI()


class Review(BaseModel):
    text: str


@app.post("/prediction")
def prediction(review: Review):
    p = float(model.predict_proba([review.text])[0][1])
    return {
        "label": "positive" if p > 0.5 else "negative",
        "score": p,
        "probabilities": {"negative": 1 - p, "positive": p},
    }
