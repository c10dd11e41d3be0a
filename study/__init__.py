"""Study orchestration: CLI, study files, Ray Tune runner, MLflow tracking, the demo."""
