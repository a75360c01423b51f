"""The shipped YAML configs (resnet-train --list-configs); a package so they install with it."""
