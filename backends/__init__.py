"""Built-in backends, each registered through the `mixtral` entry-point group like any third-party plugin."""
