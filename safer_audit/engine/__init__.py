"""Execution engines: who runs the expensive forward passes of an extraction.

``local`` (the default) runs them in this process (activations._compute). ``ray`` runs
them on a Ray cluster (engine.ray): the driver plans the shards exactly as the local
engine does, an actor pool computes the missing ones and writes them into the same
content-addressed cache, and the driver reads the store back as the local engine does.
So both engines give the same report, and a scan started on one resumes on the other.

The engine is chosen by ``ActivationConfig.engine`` (``--engine``), inside
activations.extract_activations, so every command that extracts activations (scan,
baseline, train-sae, evaluate, clean, explain, features) gets it.
"""
