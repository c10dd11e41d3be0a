"""Reading a study back from MLflow into pandas, and what people ask of it. No Ray."""
