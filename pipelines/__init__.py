"""The triview DAG, its compiled IR YAML and the local (kfp.local) runner."""
