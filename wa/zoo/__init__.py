"""Model zoos: architectures, vmapped population training, properties, family trees, tensorstore store.

``wa.zoo.build.Builder(cfg, workdir).run()`` makes one (``launch.make_zoo`` wires a config to it);
``wa.zoo.store.Zoo.open(path)`` reads one.
"""
