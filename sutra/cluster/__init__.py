"""Many engine instances behind one front end, on Ray.

- `instance.py`: `InstanceActor`, one LLMEngine and its AsyncEngine in a Ray actor process.
- `messages.py`: the plain data that crosses between an instance and the front end.
- `dispatch.py`: which instance takes a new request (round-robin, least-load, llumnix); no Ray.
- `client.py`: `ClusterClient`, the EngineClient the server talks to in front of the instances.
- `manager.py`: `Cluster`, which starts or joins Ray, creates the instances and shuts them down.

Importing this package imports no Ray; only the client and the manager do.
"""
