-- MLflow's tracking store, beside sentiflow's database on the same server.
CREATE DATABASE mlflow OWNER sentiflow;
