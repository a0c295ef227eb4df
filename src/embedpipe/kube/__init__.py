"""What embedpipe creates on a cluster and how its launchers follow it: Kubeflow Trainer
TrainJobs and batch Jobs built from typed models (``objects``), and the Kubernetes API
calls of a launcher that creates one object under a deterministic name, re-attaches to
it when a retried pod finds it there, and waits for it (``api``). No torch here."""
